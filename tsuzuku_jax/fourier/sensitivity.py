"""Fourier heat maps: the error rate and mean loss of a model when one Fourier direction of a
given L2 norm is added to every image, for every frequency of the grid, by one compiled function.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsuzuku_jax import checks, distributed, progress
from tsuzuku_jax.fourier.directions import _check_inputs, _perturbed, all_frequencies, basis

LogitsFn = Callable[[jax.Array], jax.Array]
MODES = ('random_sign', 'per_channel')


def _errors_and_loss(logits_fn, images, labels, deltas, clip, valid):
  """Per direction: misclassified count and summed loss of images + deltas[k] over the images
  where `valid` (B,) is true (padding is masked out), (K,) each."""
  k, b = deltas.shape[0], images.shape[0]
  logits = logits_fn(_perturbed(images, deltas, clip)).reshape(k, b, -1)
  wrong = (jnp.argmax(logits, -1) != labels) & valid
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(labels, (k, b)))
  return jnp.sum(wrong, 1), jnp.sum(jnp.where(valid, loss, 0.0), 1)


def image_signs(direction_index, n: int, *, key: jax.Array) -> jax.Array:
  """The random-sign heat map's +-1 signs for direction `direction_index` over n images.

  Random flips as in Yin et al.'s heat maps (their code flips per image and channel; here one
  sign per image multiplies the same pattern on every channel). Drawing them per direction over
  the whole image set makes the map independent of chunking and batching (and reproducible by
  a loop over directions).
  """
  return jax.random.rademacher(jax.random.fold_in(key, direction_index), (n,), jnp.float32)


@functools.partial(jax.jit, static_argnames=('logits_fn', 'chunk', 'batch', 'mode', 'clip', 'n'))
def _heat_chunk(logits_fn, imgs, labs, valid, freqs, eps, key, ci, *, chunk, batch, mode, clip, n):
  """Misclassified counts and summed losses, (C', chunk) each, of direction chunk `ci` (the
  directions freqs[ci * chunk:][:chunk]) over the padded image batches (scan)."""
  n_batches, _, h, w, c = imgs.shape
  pad = n_batches * batch - n
  channels = range(c) if mode == 'per_channel' else [None]
  dirs = basis((h, w), jax.lax.dynamic_slice_in_dim(freqs, ci * chunk, chunk))
  if mode == 'random_sign':
    ks = ci * chunk + jnp.arange(chunk)
    signs = jax.vmap(lambda k: image_signs(k, n, key=key))(ks)
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


def _gather_chunks(parts, n_chunks: int):
  """Every process's chunks (process p holds chunks p, p + P, ...), in chunk order."""
  from jax.experimental import multihost_utils

  procs, per = jax.process_count(), -(-n_chunks // jax.process_count())
  pad = lambda a: np.concatenate([a, np.zeros((per - len(a), *a.shape[1:]), a.dtype)])  # noqa: E731
  every = multihost_utils.process_allgather(tuple(pad(np.asarray(a)) for a in parts))
  # every[i][p, j] is chunk j * P + p
  return tuple(
    jnp.asarray(np.swapaxes(a, 0, 1).reshape(per * procs, *a.shape[2:])[:n_chunks]) for a in every
  )


def _heat_map(logits_fn, images, labels, eps, key, *, chunk, batch, mode, clip):
  """Every direction chunk through one compiled `_heat_chunk`, with progress lines."""
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
  # In a multi-process job process p computes chunks p, p + P, ... and all gather them.
  mine = distributed.mine(n_chunks)
  bar = progress.Progress(f'heat map ({n} images)', len(mine), unit='direction chunks')
  outs = []
  for j, ci in enumerate(mine):
    outs.append(_heat_chunk(logits_fn, imgs, labs, valid, freqs, eps, key, jnp.int32(ci),
                            chunk=chunk, batch=batch, mode=mode, clip=clip, n=n))  # fmt: skip
    jax.block_until_ready(outs[-1])
    bar.update(j + 1)
  channels = c if mode == 'per_channel' else 1
  none = jnp.zeros((0, channels, chunk), jnp.float32)  # a process with no chunk of its own
  wrong = jnp.stack([o[0] for o in outs]) if outs else none  # (own chunks, C', chunk)
  loss = jnp.stack([o[1] for o in outs]) if outs else none
  if jax.process_count() > 1:
    wrong, loss = _gather_chunks((wrong, loss), n_chunks)
  err = jnp.moveaxis(wrong, 1, 0).reshape(channels, -1)[:, :k] / n
  los = jnp.moveaxis(loss, 1, 0).reshape(channels, -1)[:, :k] / n
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

  Every frequency of the grid is evaluated by one compiled function, `chunk` directions per
  call over the images in batches of `batch` (scan), so memory is bounded by chunk * batch
  images; a progress line with an ETA is printed every 10 s of a long map.
  Every image counts: the last batch is padded and the padding masked out, so the result is
  the average over all N images whatever `batch` is. In a multi-process job every process calls
  it with the same arguments: each computes its share of the directions (on its own device)
  and every process returns the whole map.

  Args:
    logits_fn: a pure function images (B, H, W, C) -> logits (B, K), treating examples
      independently; pass the same function object across calls to reuse the compilation.
    images: (N, H, W, C) finite, in pixel units (within `clip` when it is given).
    labels: (N,) int labels in [0, K).
    eps: L2 norm of the perturbation (over all channels), >= 0.
    key: PRNG key, required for 'random_sign': direction k (the row-major index of (u, v))
      flips image i by `image_signs(key, k, N)[i]`; independent of chunk and batch.
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
    if mode == 'random_sign':
      raise ValueError("mode='random_sign' needs a PRNG key: heat_map(..., key=jax.random.key(0))")
    key = jax.random.key(0)  # unused by 'per_channel'
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
