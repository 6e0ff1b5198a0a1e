"""Operator-norm bounds of linear layers: training estimates and sound certificates.

Two kinds of numbers live here, and they must never be confused:

* **Estimates** (`power_iteration_step`, `power_iteration`): Rayleigh quotients ||A u|| with
  ||u|| = 1. They approach ||A||_2 from *below*, are differentiable in the weights and are what
  Lipschitz-margin training puts in its loss.
* **Certificates** (`dense_certificate`, `conv_certificate`, `pairwise_row_certificate`):
  provable *upper* bounds on ||A||_2, computed on the host in float64 and rounded up to float32.
  Only these may be used to certify a prediction.

The linear operator of a layer is always given by the layer's own function (a `conv` closed
over its kernel, with its stride and padding), so the transpose used by power iteration is
exactly `jax.vjp` of that function: any stride and padding is handled without hand-written
transposed convolutions.
"""

import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.models import Padding, conv_pads

# Relative safety margin applied to every certificate computed in float64. The float64 SVD
# and FFT errors are ~1e-13 relative; the margin is far above that and costs 1e-6 of radius.
CERT_RTOL = 1e-6
# Convolutions whose dense matrix has a side at most this long are bounded by the exact float64
# SVD of that matrix (tight on small feature maps, where the circular bound is loose).
EXACT_MAX_DIM = 2048


def _safe_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Divide by the norm itself (no epsilon added): an epsilon would shrink the estimate for
  # small weights (klasleino/gloro#8). A zero vector stays zero, with a zero (not NaN)
  # gradient. No max|x| pre-scaling (it cost 40 % of the MLP's estimate time): the sum of
  # squares underflows only for entries below ~1e-19, and then the norm reads 0, still a lower
  # bound, and the iterate is kept.
  sq = jnp.sum(jnp.square(x))
  pos = sq > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  return x / jnp.where(pos, norm, 1.0), norm


def power_iteration_step(
  op: Callable[[jax.Array], jax.Array], u: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One power-iteration step on the linear map `op`, the LMT training estimate.

  Args:
    op: a linear function (e.g. a conv closed over its kernel); it may close over parameters,
      and the returned estimate is differentiable with respect to them.
    u: the persistent iterate, with the shape of one input of `op` (e.g. (1, H, W, C)).

  Returns:
    (sigma, u_next): sigma = ||op(u / ||u||)||, a lower bound on ||op||_2 (not a certificate);
    u_next = op^T op u normalised, the next iterate (gradient-stopped). If op^T op u is zero,
    the iterate is kept.
  """
  u, _ = _safe_normalize(jax.lax.stop_gradient(u))
  v, vjp = jax.vjp(op, u)
  v_unit, sigma = _safe_normalize(v)
  # op^T applied to the unit vector: w is of size sigma, not sigma^2 (no underflow for tiny
  # weights), and its direction is the same.
  (w,) = vjp(jax.lax.stop_gradient(v_unit))
  w_unit, w_norm = _safe_normalize(jax.lax.stop_gradient(w))
  u_next = jnp.where(w_norm > 0, w_unit, u)
  return sigma, u_next


def power_iteration(
  op: Callable[[jax.Array], jax.Array], u: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array]:
  """Runs `num_iters` power-iteration steps; returns (estimate, iterate).

  The estimate converges to ||op||_2 from below (for a start not orthogonal to the top right
  singular vector). It is a lower bound, useful to measure how tight a certificate is.
  """

  def body(_, carry):
    _, u = carry
    return power_iteration_step(op, u)

  sigma, u = jax.lax.fori_loop(0, num_iters, body, (jnp.zeros((), u.dtype), u))
  return jax.lax.stop_gradient(sigma), u


def round_up(x: np.typing.ArrayLike, margin: float = 0.0) -> np.ndarray:
  """float64 bounds -> float32 bounds still >= them: x * (1 + margin) rounded to float32, one
  float32 step up wherever that fell below x."""
  x = np.asarray(x, np.float64)
  y = np.asarray(x * (1.0 + margin), np.float32)
  return np.where(y < x, np.nextafter(y, np.float32(np.inf)), y)


def _one_blas_thread():
  # XLA runs several host callbacks at once; each with a multi-threaded BLAS oversubscribes
  # the cores (measured 9-60x slower on 2 cores). One BLAS thread per callback avoids it.
  try:
    import threadpoolctl
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=1, user_api='blas')


def _host_bound(fn, *args) -> jax.Array:
  """Runs a float64 numpy bound on the host; works under jit (not differentiable)."""
  out = jax.ShapeDtypeStruct((), jnp.float32)

  def host(*a):
    with _one_blas_thread():
      return round_up(fn(*[np.asarray(x, np.float64) for x in a]), CERT_RTOL)

  return jax.pure_callback(
    host,
    out,
    *args,
    vmap_method='sequential',
  )


def _dense_bound_np(kernel: np.ndarray) -> float:
  m = kernel.reshape(-1, kernel.shape[-1])
  gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
  # Largest eigenvalue of the smaller Gram matrix (faster than an SVD); clip rounding below 0.
  return float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))


def dense_certificate(kernel: jax.typing.ArrayLike) -> jax.Array:
  """Sound upper bound on ||x -> x @ kernel||_2 for a (d_in, d_out) kernel.

  Guarantee: the float64 largest singular value of `kernel` times (1 + CERT_RTOL), rounded up
  to float32; >= the exact spectral norm of the float32 kernel. Not differentiable.
  """
  return _host_bound(_dense_bound_np, kernel)


def space_to_depth_kernel(kernel: np.ndarray, strides: Sequence[int]) -> np.ndarray:
  """(kh, kw, cin, cout) kernel of stride s -> (ceil(kh/s), ceil(kw/s), s_h*s_w*cin, cout).

  A stride-s convolution of the padded input equals a stride-1 convolution of its
  space-to-depth view (pixel (s*I + r, s*J + t, c) -> (I, J, (r, t, c))) with this kernel.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  out = np.zeros((-(-kh // sh), -(-kw // sw), sh, sw, cin, cout), kernel.dtype)
  for r in range(sh):
    for t in range(sw):
      part = kernel[r::sh, t::sw]
      out[: part.shape[0], : part.shape[1], r, t] = part
  return out.reshape(out.shape[0], out.shape[1], sh * sw * cin, cout)


def conv_matrix(kernel: np.ndarray, in_hw, strides, pads) -> np.ndarray:
  """The dense (Ho*Wo*cout, H*W*cin) matrix of a zero-padded strided conv (numpy, any dtype)."""
  kh, kw, cin, cout = kernel.shape
  (h, w), (sh, sw), ((pt, pb), (pl, pr)) = in_hw, strides, pads
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  m = np.zeros((ho, wo, cout, h, w, cin), kernel.dtype)
  for i in range(ho):
    for j in range(wo):
      for a in range(kh):
        for b in range(kw):
          p, q = sh * i + a - pt, sw * j + b - pl
          if 0 <= p < h and 0 <= q < w:
            m[i, j, :, p, q, :] += kernel[a, b].T
  return m.reshape(ho * wo * cout, h * w * cin)


def _conv_bound_np(kernel, scale, *, in_hw, strides, pads, exact_max_dim) -> float:
  kernel = kernel * scale  # per-output-channel scale (a following batch norm), in float64
  (h, w), (kh, kw), ((pt, pb), (pl, pr)) = in_hw, kernel.shape[:2], pads
  n_in = h * w * kernel.shape[2]
  n_out = ((h + pt + pb - kh) // strides[0] + 1) * ((w + pl + pr - kw) // strides[1] + 1)
  if min(n_in, n_out * kernel.shape[3]) <= exact_max_dim:
    # Small layer: the exact norm of its dense matrix (float64 SVD), no padding slack at all.
    return _dense_bound_np(conv_matrix(kernel, in_hw, strides, pads))
  k2 = space_to_depth_kernel(kernel, strides)
  grid = []
  for n, (lo, hi), s, k in zip(in_hw, pads, strides, k2.shape[:2], strict=True):
    grid.append(max(-(-(n + lo + hi) // s), k))
  # Real kernel: frequencies (u, v) and (-u, -v) have conjugate matrices, so rfft2 suffices.
  freq = np.fft.rfft2(k2, s=grid, axes=(0, 1))  # (Qh, Qw//2+1, cin', cout)
  sv = np.linalg.svd(freq, compute_uv=False)
  return float(sv[..., 0].max())


def conv_certificate(
  kernel: jax.typing.ArrayLike,
  in_hw: Sequence[int],
  strides: Sequence[int] = (1, 1),
  padding: Padding = 'SAME',
  out_scale: jax.typing.ArrayLike | None = None,
  *,
  exact_max_dim: int = EXACT_MAX_DIM,
) -> jax.Array:
  """Sound upper bound on the L2 operator norm of a zero-padded, strided 2-D convolution.

  The operator is x -> conv(x, kernel) * out_scale (cross-correlation as in
  `lax.conv_general_dilated`, NHWC/HWIO; `out_scale` (cout,) is the multiplier of a following
  batch norm, so conv + BN is bounded as one operator).

  Guarantee: with P = n + pad_lo + pad_hi the padded size, the layer equals R C S E, where E
  zero-embeds the input into a grid of Q*s >= P pixels (an isometry), S is the space-to-depth
  permutation (orthogonal), C the *circular* stride-1 convolution on the Q x Q grid with the
  space-to-depth kernel (no wrap-around reaches a kept output), and R keeps the valid outputs
  (a contraction). Hence ||layer|| <= ||C|| = max over the Q x Q frequencies of the largest
  singular value of the per-frequency (cout x s^2 cin) kernel matrix (Sedghi et al., 2019),
  computed in float64 on the host, times (1 + CERT_RTOL), rounded up to float32. Small layers
  (the dense matrix has a side <= `exact_max_dim`) get the exact float64 SVD of their dense
  matrix instead, which is tight where the circular bound is loosest (small feature maps).
  Assumes no dilation. Not differentiable.

  Args:
    kernel: (kh, kw, cin, cout) kernel.
    in_hw: spatial size (H, W) of the layer's input.
    strides: (s_h, s_w).
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).
    out_scale: optional (cout,) per-channel output multiplier.
    exact_max_dim: largest matrix side for the exact dense SVD (0: always the FFT bound).

  Returns:
    Scalar float32 upper bound.
  """
  kernel = jnp.asarray(kernel)
  pads = conv_pads(in_hw, kernel.shape[:2], strides, padding)
  scale = jnp.ones(kernel.shape[-1], kernel.dtype) if out_scale is None else out_scale

  def bound(k, s):
    return _conv_bound_np(
      k, s, in_hw=tuple(in_hw), strides=tuple(strides), pads=pads, exact_max_dim=exact_max_dim
    )

  return _host_bound(bound, kernel, scale)


def _pairwise_np(kernel: np.ndarray) -> np.ndarray:
  diff = kernel[:, :, None] - kernel[:, None, :]  # (d, K, K)
  return round_up(np.sqrt(np.sum(diff * diff, axis=0)) * (1.0 + CERT_RTOL))


def pairwise_row_norms(kernel: jax.Array) -> jax.Array:
  """(K, K) matrix ||w_i - w_j||_2 of a (d, K) head kernel, differentiable (training)."""
  # Rows along the minor axis: XLA:CPU reduces over it ~2x faster than over the leading one
  # (the forward and backward of this differentiable form sit in every LMT train step).
  rows = kernel.T
  diff = rows[:, None, :] - rows[None, :, :]
  sq = jnp.sum(jnp.square(diff), axis=-1)
  # sqrt has an infinite derivative at 0 (the diagonal): differentiate a safe argument.
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def pairwise_row_certificate(kernel: jax.typing.ArrayLike) -> jax.Array:
  """(K, K) sound upper bounds on ||w_i - w_j||_2 (float64 on the host, rounded up).

  Guarantee: entry (i, j) bounds the Lipschitz constant of x -> z_i - z_j for the last layer
  z = x @ kernel + b.
  """
  kernel = jnp.asarray(kernel)
  k = kernel.shape[-1]
  out = jax.ShapeDtypeStruct((k, k), jnp.float32)
  return jax.pure_callback(
    lambda w: _pairwise_np(np.asarray(w, np.float64)), out, kernel, vmap_method='sequential'
  )


def pool_overlap(in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int], pads) -> int:
  """Largest number of pooling windows that one input pixel can fall in (the LMT paper)."""
  n = 1
  for size, k, s, (lo, hi) in zip(in_hw, window, strides, pads, strict=True):
    n *= -(-min(k, size + lo + hi - k + 1) // s)
  return n


def max_pool_factor(in_hw, window, strides, padding: Padding = 'VALID') -> float:
  """Lipschitz factor of max pooling: sqrt(max overlap); 1 for non-overlapping windows.

  Guarantee: ||maxpool(x) - maxpool(y)||_2 <= factor * ||x - y||_2 (each window is
  1-Lipschitz in l_inf <= l_2 of its own pixels, and each pixel is in at most `overlap`
  windows).
  """
  pads = conv_pads(in_hw, window, strides, padding)
  return float(np.sqrt(pool_overlap(in_hw, window, strides, pads)))


def avg_pool_factor(in_hw, window, strides, padding: Padding = 'VALID') -> float:
  """Lipschitz factor of average pooling: sqrt(max overlap / window size).

  Guarantee: an average of k pixels is (1/sqrt(k))-Lipschitz in l_2, and each pixel feeds at
  most `overlap` windows. Exact (1/sqrt(k)) for non-overlapping windows.
  """
  pads = conv_pads(in_hw, window, strides, padding)
  return float(np.sqrt(pool_overlap(in_hw, window, strides, pads) / np.prod(window)))
