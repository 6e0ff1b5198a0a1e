"""Fourier-basis directions and Fourier heat maps (Tsuzuku & Sato, CVPR 2019; Yin et al., 2019).

The direction of frequency (u, v) on an H x W grid is the unit-L2 real image

    b_uv = Re[(1 + i) F_uv + (1 - i) F_{-u,-v}] / norm = (cos t - sin t) / sqrt(H W),
    t(m, n) = 2 pi (u m / H + v n / W),

the phase-pi/4 construction of the paper. (u, v) and (-u, -v) give different, orthogonal
directions (cos - sin and cos + sin), so the H * W directions over the whole grid form an
orthonormal basis of R^{H x W} (a discrete Hartley basis). Frequencies index the unshifted
`fft2` grid: u in 0..H-1, v in 0..W-1 (`jnp.fft.fftshift` centres them for display).

Images are NHWC in [0, 1] pixel units; norms are in those units. A perturbation of L2 norm eps
on C channels puts eps * b_uv * s_c / sqrt(C) on channel c, for a sign pattern s in {+1, -1}^C.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]
MODES = ('random_sign', 'per_channel')


def _check_grid(hw) -> tuple[int, int]:
  h, w = (int(a) for a in hw)
  if h < 1 or w < 1:
    raise ValueError(f'grid must be positive (H, W), got {hw}')
  return h, w


def check_images(images: jax.Array, name: str = 'images') -> None:
  """Raises ValueError unless `images` is an NHWC batch (4-D)."""
  if np.ndim(images) != 4:
    raise ValueError(f'{name} must be an NHWC batch (N, H, W, C); got shape {np.shape(images)}')


def check_frequency(hw, freq) -> tuple[int, int]:
  """(u, v) as ints, or ValueError when it lies outside the 0..H-1 x 0..W-1 grid."""
  h, w = _check_grid(hw)
  u, v = (int(a) for a in freq)
  if not (0 <= u < h and 0 <= v < w):
    raise ValueError(
      f'frequency {tuple(freq)} is outside the {h}x{w} grid (0..{h - 1}, 0..{w - 1})'
    )
  return u, v


def basis(hw, freqs: jax.Array) -> jax.Array:
  """Unit-L2 real Fourier directions, built with `jnp.fft.ifft2`.

  Args:
    hw: (H, W).
    freqs: (K, 2) int frequencies (u, v) on the unshifted grid.

  Returns:
    (K, H, W) float32 directions b_uv (see the module docstring).
  """
  h, w = _check_grid(hw)
  freqs = jnp.asarray(freqs, jnp.int32).reshape(-1, 2)
  onehot = jax.nn.one_hot(freqs[:, 0], h)[:, :, None] * jax.nn.one_hot(freqs[:, 1], w)[:, None]
  # ifft2 of (1 + i) at (u, v) is (1 + i) e^{i t} / (H W); its real part is (cos t - sin t) / (HW).
  spatial = jnp.fft.ifft2((1 + 1j) * onehot.astype(jnp.complex64), axes=(1, 2))
  return (jnp.real(spatial) * np.sqrt(h * w)).astype(jnp.float32)


def all_frequencies(hw) -> jax.Array:
  """(H W, 2) int32 (u, v) over the whole grid, row-major."""
  h, w = _check_grid(hw)
  u, v = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  return jnp.stack([u.ravel(), v.ravel()], 1).astype(jnp.int32)


def linf_of_unit_direction(hw, freq) -> float:
  """L-infinity norm of the unit-L2 direction b_uv (exact, from its values on the grid)."""
  return float(jnp.max(jnp.abs(basis(hw, jnp.asarray([check_frequency(hw, freq)])))))


def perturbation(direction: jax.Array, signs: jax.Array, eps: float, norm: str = 'l2') -> jax.Array:
  """(H, W) direction x (C,) signs -> (H, W, C) perturbation of L2 norm eps, or Linf norm eps.

  With norm='linf' the same pattern is scaled so that its largest pixel change is eps.
  """
  if eps < 0:
    raise ValueError(f'the perturbation norm must be >= 0, got eps={eps}')
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  signs = jnp.asarray(signs, jnp.float32)
  d = direction[..., None] * signs / jnp.sqrt(signs.size)
  if norm == 'linf':
    return d * (eps / jnp.max(jnp.abs(d)))
  return d * eps


def _errors_and_loss(logits_fn, images, labels, delta, clip):
  x = images + delta
  if clip is not None:
    x = jnp.clip(x, *clip)
  logits = logits_fn(x)
  wrong = jnp.argmax(logits, -1) != labels
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
  return jnp.sum(wrong), jnp.sum(loss)


def _deltas(dirs, c, eps, mode, signs_key, n_img):
  """(K, n_img or 1, H, W, C) perturbations for a chunk of K directions."""
  if mode == 'random_sign':
    # Yin et al.: one random global sign per (direction, image), same pattern on every channel.
    r = jax.random.rademacher(signs_key, (dirs.shape[0], n_img), jnp.float32)
    return eps * r[:, :, None, None, None] * dirs[:, None, :, :, None] / np.sqrt(c)
  raise AssertionError(mode)


@functools.partial(jax.jit, static_argnames=('logits_fn', 'chunk', 'batch', 'mode', 'clip'))
def _heat_map(logits_fn, images, labels, eps, key, *, chunk, batch, mode, clip):
  n, h, w, c = images.shape
  freqs = all_frequencies((h, w))
  k = freqs.shape[0]
  n_chunks, n_batches = -(-k // chunk), n // batch
  freqs = jnp.concatenate([freqs, jnp.zeros((n_chunks * chunk - k, 2), jnp.int32)])
  imgs = images[: n_batches * batch].reshape(n_batches, batch, h, w, c)
  labs = labels[: n_batches * batch].reshape(n_batches, batch)
  channels = range(c) if mode == 'per_channel' else [None]

  def one_chunk(ci):
    dirs = basis((h, w), jax.lax.dynamic_slice_in_dim(freqs, ci * chunk, chunk))

    def one_batch(carry, bi):
      x, y = imgs[bi], labs[bi]
      outs = []
      for ch in channels:
        if ch is None:
          bkey = jax.random.fold_in(jax.random.fold_in(key, ci), bi)
          deltas = _deltas(dirs, c, eps, mode, bkey, batch)
        else:
          onehot = jax.nn.one_hot(ch, c)
          deltas = eps * dirs[:, None, :, :, None] * onehot
        f = jax.vmap(lambda d, x=x, y=y: _errors_and_loss(logits_fn, x, y, d, clip))
        outs.append(f(deltas))
      wrong = jnp.stack([o[0] for o in outs])
      loss = jnp.stack([o[1] for o in outs])
      return (carry[0] + wrong, carry[1] + loss), None

    zero = jnp.zeros((len(channels), chunk), jnp.float32)
    (wrong, loss), _ = jax.lax.scan(one_batch, (zero, zero), jnp.arange(n_batches))
    return wrong, loss

  wrong, loss = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # (n_chunks, C', chunk)
  count = n_batches * batch
  err = jnp.moveaxis(wrong, 1, 0).reshape(len(channels), -1)[:, :k] / count
  los = jnp.moveaxis(loss, 1, 0).reshape(len(channels), -1)[:, :k] / count
  return err.reshape(-1, h, w), los.reshape(-1, h, w)


def heat_map(
  logits_fn: LogitsFn,
  images: jax.Array,
  labels: jax.Array,
  eps: float,
  *,
  key: jax.Array | None = None,
  mode: str = 'random_sign',
  chunk: int = 64,
  batch: int = 256,
  clip: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[jax.Array, jax.Array]:
  """Error rate and mean loss when one Fourier direction of L2 norm eps is added to every image.

  Every frequency of the grid is evaluated inside one jit: `chunk` directions at a time (vmap)
  over the images in batches of `batch` (scan), so memory is bounded by chunk * batch images.

  Args:
    logits_fn: a pure function images (B, H, W, C) -> logits (B, K), treating examples
      independently; pass the same function object across calls to reuse the compilation.
    images: (N, H, W, C) in pixel units; N is truncated to a multiple of `batch`.
    labels: (N,) int labels.
    eps: L2 norm of the perturbation (over all channels), >= 0.
    key: PRNG key for 'random_sign' (one random sign per direction and image).
    mode: 'random_sign' (Yin et al.: the same pattern on every channel, times a random sign per
      image) or 'per_channel' (one map per channel, perturbing only that channel).
    chunk: directions per vmapped chunk.
    batch: images per scanned batch (<= N).
    clip: clip perturbed images to this range (None: no clipping).

  Returns:
    `(error, loss)`, each (M, H, W) indexed by frequency (u, v) on the unshifted grid, with
    M = 1 ('random_sign') or C ('per_channel').

  Raises:
    ValueError: images not NHWC, a negative eps, an unknown mode, or bad chunk/batch sizes.
  """
  check_images(images)
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  n = images.shape[0]
  if chunk < 1 or not 1 <= batch <= n:
    raise ValueError(f'need chunk >= 1 and 1 <= batch <= N={n}; got chunk={chunk}, batch={batch}')
  if key is None:
    key = jax.random.key(0)
  clip = None if clip is None else tuple(float(a) for a in clip)
  return _heat_map(
    logits_fn,
    jnp.asarray(images, jnp.float32),
    jnp.asarray(labels, jnp.int32),
    jnp.float32(eps),
    key,
    chunk=min(chunk, images.shape[1] * images.shape[2]),
    batch=batch,
    mode=mode,
    clip=clip,
  )
