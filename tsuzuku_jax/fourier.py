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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import attacks, checks

LogitsFn = Callable[[jax.Array], jax.Array]
MODES = ('random_sign', 'per_channel')


def _check_grid(hw) -> tuple[int, int]:
  h, w = (int(a) for a in hw)
  if h < 1 or w < 1:
    raise ValueError(f'grid must be positive (H, W), got {hw}')
  return h, w


def _check_inputs(images, clip, labels=None) -> None:
  """Images NHWC, finite and within the clip range when the function works in pixel space;
  labels (reference labels: any class index) one per image."""
  box = None if clip is None else tuple(clip)
  checks.check_images(images, 'images', pixel_range=box, hint=' (or pass clip=None)')
  if labels is not None:
    checks.check_labels(labels, None, 'labels', n=np.shape(images)[0])


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
  return _perturb(direction, signs, eps, norm)


def _perturb(direction, signs, eps, norm):
  signs = jnp.asarray(signs, jnp.float32)
  d = direction[..., None] * signs / jnp.sqrt(signs.size)
  if norm == 'linf':
    return d * (eps / jnp.max(jnp.abs(d)))
  return d * eps


def _perturbed(images, deltas, clip):
  """(K, B, H, W, C) deltas (or (K, 1, ...)) on (B, H, W, C) images, as one (K B)-image batch.

  The model sees one large batch instead of being vmapped over directions: models treat
  examples independently, and a vmapped model is slower (on the CPU, 2x for the small CNN).
  """
  z = images[None] + deltas
  if clip is not None:
    z = jnp.clip(z, *clip)
  return z.reshape(-1, *images.shape[1:])


def _errors_and_loss(logits_fn, images, labels, deltas, clip, valid):
  """Per direction: misclassified count and summed loss of images + deltas[k] over the images
  where `valid` (B,) is true (padding is masked out), (K,) each."""
  k, b = deltas.shape[0], images.shape[0]
  logits = logits_fn(_perturbed(images, deltas, clip)).reshape(k, b, -1)
  wrong = (jnp.argmax(logits, -1) != labels) & valid
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[None, :, None], -1)[..., 0]
  return jnp.sum(wrong, 1), jnp.sum(jnp.where(valid, loss, 0.0), 1)


def image_signs(key: jax.Array, direction_index, n: int) -> jax.Array:
  """The random-sign heat map's +-1 signs for direction `direction_index` over n images.

  Random flips as in Yin et al.'s heat maps (their code flips per image and channel; here one
  sign per image multiplies the same pattern on every channel). Drawing them per direction over
  the whole image set makes the map independent of chunking and batching (and reproducible by
  a loop over directions).
  """
  return jax.random.rademacher(jax.random.fold_in(key, direction_index), (n,), jnp.float32)


@functools.partial(jax.jit, static_argnames=('logits_fn', 'chunk', 'batch', 'mode', 'clip'))
def _heat_map(logits_fn, images, labels, eps, key, *, chunk, batch, mode, clip):
  n, h, w, c = images.shape
  freqs = all_frequencies((h, w))
  k = freqs.shape[0]
  n_chunks, n_batches = -(-k // chunk), -(-n // batch)
  freqs = jnp.concatenate([freqs, jnp.zeros((n_chunks * chunk - k, 2), jnp.int32)])
  # Every image counts: the last batch is padded with zero images, masked out of the sums.
  pad = n_batches * batch - n
  imgs = jnp.concatenate([images, jnp.zeros((pad, h, w, c), images.dtype)])
  imgs = imgs.reshape(n_batches, batch, h, w, c)
  labs = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)]).reshape(n_batches, batch)
  valid = (jnp.arange(n_batches * batch) < n).reshape(n_batches, batch)
  channels = range(c) if mode == 'per_channel' else [None]

  def one_chunk(ci):
    dirs = basis((h, w), jax.lax.dynamic_slice_in_dim(freqs, ci * chunk, chunk))
    if mode == 'random_sign':
      ks = ci * chunk + jnp.arange(chunk)
      signs = jax.vmap(lambda k: image_signs(key, k, n))(ks)
      signs = jnp.concatenate([signs, jnp.ones((chunk, pad), signs.dtype)], 1)

    def one_batch(carry, bi):
      x, y = imgs[bi], labs[bi]
      outs = []
      for ch in channels:
        if ch is None:  # the same pattern on every channel, one random sign per image
          sgn = jax.lax.dynamic_slice_in_dim(signs, bi * batch, batch, axis=1)
          deltas = eps * sgn[:, :, None, None, None] * dirs[:, None, :, :, None] / np.sqrt(c)
        else:
          onehot = jax.nn.one_hot(ch, c)
          deltas = eps * dirs[:, None, :, :, None] * onehot
        outs.append(_errors_and_loss(logits_fn, x, y, deltas, clip, valid[bi]))
      wrong = jnp.stack([o[0] for o in outs])
      loss = jnp.stack([o[1] for o in outs])
      return (carry[0] + wrong, carry[1] + loss), None

    zero = jnp.zeros((len(channels), chunk), jnp.float32)
    (wrong, loss), _ = jax.lax.scan(one_batch, (zero, zero), jnp.arange(n_batches))
    return wrong, loss

  wrong, loss = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # (n_chunks, C', chunk)
  err = jnp.moveaxis(wrong, 1, 0).reshape(len(channels), -1)[:, :k] / n
  los = jnp.moveaxis(loss, 1, 0).reshape(len(channels), -1)[:, :k] / n
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

  Every frequency of the grid is evaluated inside one jit: `chunk` directions at a time
  over the images in batches of `batch` (scan), so memory is bounded by chunk * batch images.
  Every image counts: the last batch is padded and the padding masked out, so the result is
  the average over all N images whatever `batch` is.

  Args:
    logits_fn: a pure function images (B, H, W, C) -> logits (B, K), treating examples
      independently; pass the same function object across calls to reuse the compilation.
    images: (N, H, W, C) finite, in pixel units (within `clip` when it is given).
    labels: (N,) int labels in [0, K).
    eps: L2 norm of the perturbation (over all channels), >= 0.
    key: PRNG key for 'random_sign': direction k (the row-major index of (u, v)) flips image i
      by `image_signs(key, k, N)[i]`; independent of chunk and batch.
    mode: 'random_sign' (the same pattern on every channel, times a random sign per image; Yin
      et al.'s code draws a sign per image and channel and puts the full norm on each channel)
      or 'per_channel' (one map per channel, perturbing only that channel).
    chunk: directions per chunk (chunk x batch images per model call).
    batch: images per scanned batch (at most N).
    clip: clip perturbed images to this range (None: no clipping).

  Returns:
    `(error, loss)`, each (M, H, W) indexed by frequency (u, v) on the unshifted grid, with
    M = 1 ('random_sign') or C ('per_channel').

  Raises:
    ValueError: images not NHWC, non-finite or outside `clip`, labels outside [0, K) or of
      another length, a negative eps, an unknown mode, or bad chunk/batch sizes.
  """
  _check_inputs(images, clip)
  checks.check_labels_for(logits_fn, images, labels)
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  n = images.shape[0]
  if chunk < 1 or batch < 1 or n < 1:
    raise ValueError(f'need chunk, batch and N >= 1; got chunk={chunk}, batch={batch}, N={n}')
  batch = min(batch, n)
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


QueryFn = Callable[[jax.Array], jax.Array]  # images (B, H, W, C) -> predicted labels (B,)


def sign_patterns(c: int) -> jax.Array:
  """All 2^C channel sign patterns, (2^C, C) float32 in {+1, -1}, pattern k = bits of k."""
  k = np.arange(2**c)[:, None]
  return jnp.asarray(1.0 - 2.0 * ((k >> np.arange(c)) & 1), jnp.float32)


def candidate_perturbation(hw_c, index: int, eps: float, norm: str = 'l2') -> jax.Array:
  """The (H, W, C) perturbation of candidate `index` = frequency_index * 2^C + sign_pattern."""
  h, w, c = hw_c
  f, s = divmod(int(index), 2**c)
  direction = basis((h, w), all_frequencies((h, w))[f][None])[0]
  return perturbation(direction, sign_patterns(c)[s], eps, norm)


@functools.partial(jax.jit, static_argnames=('query_fn', 'chunk', 'batch', 'norm', 'clip'))
def _fooled_counts(query_fn, images, ref, cand, eps, *, chunk, batch, norm, clip):
  """Number of images whose predicted label differs from `ref`, per candidate index."""
  n, h, w, c = images.shape
  freqs = all_frequencies((h, w))
  signs = sign_patterns(c)
  k = cand.shape[0]
  n_chunks, n_batches = -(-k // chunk), -(-n // batch)
  cand = jnp.concatenate([cand, jnp.zeros((n_chunks * chunk - k,), cand.dtype)])
  pad = n_batches * batch - n
  imgs = jnp.concatenate([images, jnp.zeros((pad, h, w, c), images.dtype)])
  refs = jnp.concatenate([ref, jnp.full((pad,), -1, ref.dtype)])  # padding never counts
  valid = jnp.arange(n_batches * batch) < n
  imgs = imgs.reshape(n_batches, batch, h, w, c)
  refs, valid = refs.reshape(n_batches, batch), valid.reshape(n_batches, batch)

  def one_chunk(ci):
    idx = jax.lax.dynamic_slice_in_dim(cand, ci * chunk, chunk)
    dirs = basis((h, w), freqs[idx // (2**c)])
    deltas = jax.vmap(lambda d, s: _perturb(d, s, eps, norm))(dirs, signs[idx % (2**c)])

    def one_batch(total, bi):
      pred = query_fn(_perturbed(imgs[bi], deltas[:, None], clip)).reshape(chunk, batch)
      return total + jnp.sum((pred != refs[bi]) & valid[bi], 1), None

    total, _ = jax.lax.scan(one_batch, jnp.zeros((chunk,), jnp.int32), jnp.arange(n_batches))
    return total

  return jax.lax.map(one_chunk, jnp.arange(n_chunks)).reshape(-1)[:k]


class AttackResult(NamedTuple):
  perturbation: jax.Array  # (H, W, C)
  candidate: int  # frequency_index * 2^C + sign pattern index
  frequency: tuple[int, int]  # (u, v) on the unshifted grid
  signs: tuple[float, ...]  # (C,)
  fooling_rate: float  # on the whole search set
  queries: int  # label queries, clean-label queries included


def fourier_attack(
  query_fn: QueryFn,
  images: jax.Array,
  eps: float,
  *,
  labels: jax.Array | None = None,
  norm: str = 'l2',
  search: str = 'exhaustive',
  eta: int = 4,
  first_images: int = 16,
  chunk: int = 64,
  batch: int = 256,
  clip: tuple[float, float] | None = (0.0, 1.0),
) -> AttackResult:
  """Black-box universal Fourier attack: the (frequency, channel signs) that fools most images.

  Uses only predicted labels from `query_fn`. An image is fooled when its prediction differs
  from its reference label: `labels` if given, else its clean prediction (N queries, counted).
  Ties go to the lowest candidate index, so the result does not depend on candidate order,
  chunking or batching.

  Args:
    query_fn: images (B, H, W, C) -> predicted labels (B,); pure, treated as a black box,
      treating examples independently (candidates x images are queried as one large batch).
    images: (N, H, W, C) search set in pixel units.
    eps: perturbation norm (L2 over all channels, or Linf with norm='linf'), >= 0.
    labels: reference labels (N,), or None to query the clean predictions.
    norm: 'l2' or 'linf'.
    search: 'exhaustive' (every candidate on every image) or 'halving' (successive halving:
      all candidates on `first_images` images, keep the best 1/eta, multiply the images by eta,
      until one candidate or all images remain; the survivor is evaluated on the whole set).
    eta: halving factor (>= 2).
    first_images: images in the first halving round.
    chunk: candidates per chunk (chunk x batch images per query).
    batch: images per scanned batch.
    clip: clip perturbed images to this range (None: no clipping).

  Returns:
    An `AttackResult`; its fooling rate is on the whole search set.
  """
  _check_inputs(images, clip, labels)
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  if search not in ('exhaustive', 'halving'):
    raise ValueError(f"search must be 'exhaustive' or 'halving', got {search!r}")
  if eta < 2 or first_images < 1 or chunk < 1 or batch < 1:
    raise ValueError(
      f'need eta >= 2 and positive first_images, chunk, batch; got {eta}, '
      f'{first_images}, {chunk}, {batch}'
    )
  images = jnp.asarray(images, jnp.float32)
  n, h, w, c = images.shape
  queries = 0
  if labels is None:
    labels = jnp.concatenate([query_fn(images[i : i + batch]) for i in range(0, n, batch)])
    queries += n
  labels = jnp.asarray(labels, jnp.int32)
  clip = None if clip is None else tuple(float(a) for a in clip)
  kw = dict(chunk=chunk, norm=norm, clip=clip)
  cand = jnp.arange(h * w * 2**c, dtype=jnp.int32)
  m = n if search == 'exhaustive' else min(first_images, n)
  while True:
    # batch <= m: a small halving round must not pay for padding up to a full batch.
    counts = _fooled_counts(query_fn, images[:m], labels[:m], cand, eps, batch=min(batch, m), **kw)
    counts = np.asarray(counts)
    queries += int(cand.size) * m
    order = np.lexsort((np.asarray(cand), -counts))  # most fooled first, then lowest index
    if m == n:
      best = int(np.asarray(cand)[order[0]])
      fooled = int(counts[order[0]])
      break
    keep = max(1, -(-cand.size // eta))
    cand = jnp.asarray(np.sort(np.asarray(cand)[order[:keep]]))
    if keep == 1:
      m = n  # the survivor, on the whole set
    else:
      m = min(n, m * eta)
  delta = candidate_perturbation((h, w, c), best, eps, norm)
  f, s = divmod(best, 2**c)
  u, v = (int(a) for a in np.asarray(all_frequencies((h, w))[f]))
  signs = tuple(float(a) for a in np.asarray(sign_patterns(c)[s]))
  return AttackResult(delta, best, (u, v), signs, fooled / n, queries)


def fooling_rate(
  query_fn: QueryFn,
  images: jax.Array,
  delta: jax.Array,
  labels: jax.Array,
  *,
  clip: tuple[float, float] | None = (0.0, 1.0),
  batch: int = 256,
) -> float:
  """Fraction of `images` whose predicted label under `images + delta` differs from `labels`
  (all N images, the last batch smaller)."""
  _check_inputs(images, clip, labels)
  return _fooling_rate(query_fn, images, delta, labels, clip=clip, batch=batch)


def _fooling_rate(query_fn, images, delta, labels, *, clip, batch):
  fooled = 0
  for i in range(0, images.shape[0], batch):
    x = jnp.asarray(images[i : i + batch], jnp.float32) + delta
    if clip is not None:
      x = jnp.clip(x, *clip)
    fooled += int(jnp.sum(query_fn(x) != jnp.asarray(labels[i : i + batch])))
  return fooled / images.shape[0]


def shifted_fooling_rates(
  query_fn: QueryFn,
  images: jax.Array,
  delta: jax.Array,
  labels: jax.Array,
  *,
  clip: tuple[float, float] | None = (0.0, 1.0),
  batch: int = 256,
  stride: int = 1,
) -> np.ndarray:
  """Fooling rates of the circular shifts `roll(delta, (i, j))` (shift invariance), for i, j
  on the grid's multiples of `stride`: an (H / stride, W / stride) array, rounded up."""
  if stride < 1:
    raise ValueError(f'stride must be >= 1, got {stride}')
  _check_inputs(images, clip, labels)
  h, w = delta.shape[:2]
  rows, cols = range(0, h, stride), range(0, w, stride)
  out = np.zeros((len(rows), len(cols)))
  for a, i in enumerate(rows):
    for b, j in enumerate(cols):
      shifted = jnp.roll(delta, (i, j), axis=(0, 1))
      out[a, b] = _fooling_rate(query_fn, images, shifted, labels, clip=clip, batch=batch)
  return out


def random_perturbations(key: jax.Array, shape, eps: float, count: int, norm: str = 'l2'):
  """`count` random perturbations of shape (H, W, C): uniform on the L2 sphere of radius eps,
  or, with norm='linf', random signs times eps (a corner of the Linf ball)."""
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if norm == 'linf':
    return eps * jax.random.rademacher(key, (count, *shape), jnp.float32)
  g = jax.random.normal(key, (count, *shape))
  return eps * g / attacks.l2_norm(g).reshape(-1, *(1,) * len(shape))


def calibrate_eps(
  query_fn: QueryFn,
  images: jax.Array,
  labels: jax.Array,
  *,
  key: jax.Array,
  target: float = 0.05,
  trials: int = 20,
  iters: int = 12,
  norm: str = 'l2',
  clip: tuple[float, float] | None = (0.0, 1.0),
  batch: int = 256,
) -> tuple[float, float]:
  """The norm at which random perturbations fool `target` of the images: the paper's way to
  pick a budget ("noise of this size is harmless") without looking at the attack.

  Bisects eps in [0, hi], where hi doubles from the mean image norm until the mean fooling
  rate of `trials` fixed random unit directions (`random_perturbations`, scaled) exceeds
  `target`. Returns `(eps, rate)`: the largest evaluated eps whose mean rate is <= target, and
  that rate. Queries `trials` * N labels per evaluated eps.
  """
  _check_inputs(images, clip, labels)
  if not 0 <= target < 1 or trials < 1 or iters < 1:
    raise ValueError(
      f'need 0 <= target < 1, trials >= 1, iters >= 1; got {target}, {trials}, {iters}'
    )
  images = jnp.asarray(images, jnp.float32)
  units = random_perturbations(key, images.shape[1:], 1.0, trials, norm)

  def rate(eps):
    return float(
      np.mean(
        [_fooling_rate(query_fn, images, eps * u, labels, clip=clip, batch=batch) for u in units]
      )
    )

  flat = images.reshape(images.shape[0], -1)
  scale = jnp.max(jnp.abs(flat), 1) if norm == 'linf' else attacks.l2_norm(images)
  lo, lo_rate, hi = 0.0, rate(0.0), max(float(jnp.mean(scale)), 1e-6)
  if lo_rate > target:
    raise ValueError(f'{lo_rate:.3f} of the images are misclassified with no perturbation')
  for _ in range(30):
    hi_rate = rate(hi)
    if hi_rate > target:
      break
    lo, lo_rate, hi = hi, hi_rate, 2 * hi
  else:
    raise ValueError(f'random perturbations never fool more than {target} of the images')
  for _ in range(iters):
    mid = (lo + hi) / 2
    r = rate(mid)
    if r <= target:
      lo, lo_rate = mid, r
    else:
      hi = mid
  return lo, lo_rate


def _project(delta, eps, norm):
  if norm == 'linf':
    return jnp.clip(delta, -eps, eps)
  n = jnp.linalg.norm(delta)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-30))


def whitebox_universal(
  logits_fn: LogitsFn,
  images: jax.Array,
  labels: jax.Array,
  eps: float,
  *,
  key: jax.Array,
  steps: int = 200,
  batch: int = 128,
  step_size: float | None = None,
  norm: str = 'l2',
  clip: tuple[float, float] | None = (0.0, 1.0),
) -> jax.Array:
  """White-box universal perturbation (the upper reference): projected gradient ascent on the
  mean cross-entropy of `logits_fn(images + delta)` over minibatches of the images.

  Uses gradients, unlike `fourier_attack`. Each step takes a normalised gradient step of
  `step_size` (default eps / 10; the sign of the gradient for 'linf') and projects back onto the
  eps-ball. Minibatches are drawn with `key`.

  Returns:
    The (H, W, C) perturbation, with norm <= eps.
  """
  _check_inputs(images, clip)
  checks.check_labels_for(logits_fn, images, labels)
  if eps < 0 or steps < 1:
    raise ValueError(f'need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}')
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  n = images.shape[0]
  batch = min(batch, n)
  size = eps / 10 if step_size is None else step_size

  def loss(delta, x, y):
    z = x + delta
    if clip is not None:
      z = jnp.clip(z, *clip)
    logits = logits_fn(z)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

  @jax.jit
  def run(key):
    def step(delta, k):
      idx = jax.random.choice(k, n, (batch,), replace=False)
      g = jax.grad(loss)(delta, images[idx], labels[idx])
      if norm == 'linf':
        g = jnp.sign(g)
      else:
        g = g / jnp.maximum(jnp.linalg.norm(g), 1e-30)
      return _project(delta + size * g, eps, norm), None

    delta0 = jnp.zeros(images.shape[1:], jnp.float32)
    delta, _ = jax.lax.scan(step, delta0, jax.random.split(key, steps))
    return delta

  return run(key)
