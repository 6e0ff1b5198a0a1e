"""The black-box universal Fourier attack (Tsuzuku & Sato, CVPR 2019): the (frequency, channel
signs) candidate that changes most predicted labels, by exhaustive search or successive
halving, with its fooling rate, its fooling rates under circular shifts, and the norm at which
random perturbations start to fool (`calibrate_eps`).
"""

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import attacks, progress
from tsuzuku_jax.fourier.directions import (
  _check_inputs,
  _perturb,
  _perturbed,
  all_frequencies,
  basis,
  perturbation,
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


@functools.partial(jax.jit, static_argnames=('query_fn', 'chunk', 'norm', 'clip'))
def _fooled_chunk(query_fn, imgs, refs, valid, cand, eps, ci, *, chunk, norm, clip):
  """Per candidate of chunk `ci` (cand[ci * chunk:][:chunk]): the number of images whose
  predicted label differs from `refs`, over the padded image batches (scan)."""
  n_batches, batch, h, w, c = imgs.shape
  idx = jax.lax.dynamic_slice_in_dim(cand, ci * chunk, chunk)
  dirs = basis((h, w), all_frequencies((h, w))[idx // (2**c)])
  deltas = jax.vmap(lambda d, s: _perturb(d, s, eps, norm))(dirs, sign_patterns(c)[idx % (2**c)])

  def one_batch(total, bi):
    pred = query_fn(_perturbed(imgs[bi], deltas[:, None], clip)).reshape(chunk, batch)
    return total + jnp.sum((pred != refs[bi]) & valid[bi], 1), None

  total, _ = jax.lax.scan(one_batch, jnp.zeros((chunk,), jnp.int32), jnp.arange(n_batches))
  return total


def _fooled_counts(query_fn, images, ref, cand, eps, *, chunk, batch, norm, clip, label='search'):
  """Number of images whose predicted label differs from `ref`, per candidate index: every
  chunk of candidates through one compiled `_fooled_chunk`, with progress lines."""
  n, h, w, c = images.shape
  k = cand.shape[0]
  n_chunks, n_batches = -(-k // chunk), -(-n // batch)
  cand = jnp.concatenate([cand, jnp.zeros((n_chunks * chunk - k,), cand.dtype)])
  pad = n_batches * batch - n
  imgs = jnp.concatenate([images, jnp.zeros((pad, h, w, c), images.dtype)])
  refs = jnp.concatenate([ref, jnp.full((pad,), -1, ref.dtype)])  # padding never counts
  valid = jnp.arange(n_batches * batch) < n
  imgs = imgs.reshape(n_batches, batch, h, w, c)
  refs, valid = refs.reshape(n_batches, batch), valid.reshape(n_batches, batch)
  bar = progress.Progress(f'{label} ({k} candidates x {n} images)', n_chunks, unit='chunks')
  out = []
  for ci in range(n_chunks):
    out.append(np.asarray(_fooled_chunk(query_fn, imgs, refs, valid, cand, eps, jnp.int32(ci),
                                        chunk=chunk, norm=norm, clip=clip)))  # fmt: skip
    bar.update(ci + 1)
  return np.concatenate(out)[:k]


class AttackResult(NamedTuple):
  perturbation: jax.Array  # (H, W, C)
  candidate: int  # frequency_index * 2^C + sign pattern index
  frequency: tuple[int, int]  # (u, v) on the unshifted grid
  signs: tuple[float, ...]  # (C,)
  fooling_rate: float  # on the whole search set
  queries: int  # label queries, clean-label queries included


def _check_search(eps, norm, search, eta, first_images, chunk, batch) -> None:
  """`fourier_attack`'s settings, or ValueError naming the first bad one."""
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
  _check_search(eps, norm, search, eta, first_images, chunk, batch)
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
  for r in itertools.count(1):
    # batch <= m: a small halving round must not pay for padding up to a full batch.
    counts = _fooled_counts(query_fn, images[:m], labels[:m], cand, eps, batch=min(batch, m),
                            label=f'search round {r}', **kw)  # fmt: skip
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
  rate of `trials` fixed random unit directions (`attacks.random_perturbations`, scaled) exceeds
  `target`. Returns `(eps, rate)`: the largest evaluated eps whose mean rate is <= target, and
  that rate. Queries `trials` * N labels per evaluated eps.
  """
  _check_inputs(images, clip, labels)
  if not 0 <= target < 1 or trials < 1 or iters < 1:
    raise ValueError(
      f'need 0 <= target < 1, trials >= 1, iters >= 1; got {target}, {trials}, {iters}'
    )
  images = jnp.asarray(images, jnp.float32)
  units = attacks.random_perturbations(images.shape[1:], 1.0, trials, key=key, norm=norm)

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
