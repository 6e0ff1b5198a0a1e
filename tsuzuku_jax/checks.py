"""Input checks at the door: images, labels and parameters, with errors that name the problem.

Every public entry point that takes data or parameters calls these once per call, on the host
(one cheap reduction per array), never inside a training step. Traced values (a call from
inside the user's own `jax.jit`) cannot be inspected and are passed through unchecked.

An error is an `InvalidInput` (a `ValueError`) whose one-line message names the argument, the
first offending index or value, and what was expected, e.g.
`images[3, 0, 5, 0] is nan; expected finite pixel values`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class InvalidInput(ValueError):
  """A user-supplied array, file or value is malformed; the message says which and why."""


class MissingInput(InvalidInput, FileNotFoundError):
  """A named input file or folder does not exist."""


class MissingDependency(InvalidInput, ImportError):
  """The input asked for needs an optional package that is not installed (the message says
  which and how to install it)."""


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


@jax.jit
def _summary(x):
  return jnp.all(jnp.isfinite(x)), jnp.min(x), jnp.max(x)


def _index(mask) -> str:
  """'[i, j, ...]' of the first True entry of a boolean array."""
  return '[' + ', '.join(str(int(i)) for i in np.argwhere(np.asarray(mask))[0]) + ']'


def check_images(
  images: Any,
  name: str = 'images',
  *,
  pixel_range: tuple[float, float] | None = (0.0, 1.0),
  ndim: int | None = 4,
  hint: str = '',
) -> None:
  """Raises `InvalidInput` unless `images` is a finite float batch (NHWC when ndim=4).

  Args:
    images: the array to check (numpy or jax; a tracer is not checked).
    name: the argument's name in messages.
    pixel_range: (lo, hi) every value must lie in, for functions that work in pixel space (they
      clip to it or measure norms in its units); None: only finiteness is checked.
    ndim: required number of dimensions (4: (N, H, W, C)); None: any.
    hint: appended to the out-of-range message (e.g. how to skip the range check).
  """
  if _traced(images):
    return
  shape, dtype = np.shape(images), np.result_type(images)
  if ndim is not None and len(shape) != ndim:
    what = 'an NHWC batch (N, H, W, C)' if ndim == 4 else f'{ndim}-D'
    raise InvalidInput(f'{name} must be {what}; got shape {shape}')
  if not np.issubdtype(dtype, np.floating):
    raise InvalidInput(
      f'{name} has dtype {dtype}; expected float pixel values in [0, 1] (uint8 / 255.0)'
    )
  if not np.prod(shape):
    raise InvalidInput(f'{name} is empty (shape {shape})')
  if isinstance(images, jax.Array):  # one reduction on the device
    with jax.ensure_compile_time_eval():  # concrete values closed over inside a user's jit
      finite, lo, hi = (float(v) for v in _summary(images))
  else:
    finite, lo, hi = bool(np.isfinite(images).all()), float(np.min(images)), float(np.max(images))
  outside = pixel_range is not None and (lo < pixel_range[0] or hi > pixel_range[1])
  if finite and not outside:
    return
  host = np.asarray(images)  # on the way to an error only: find the first bad entry
  if not finite:
    bad = ~np.isfinite(host)
    raise InvalidInput(f'{name}{_index(bad)} is {host[bad][0]}; expected finite pixel values')
  bad = (host < pixel_range[0]) | (host > pixel_range[1])
  raise InvalidInput(
    f'{name}{_index(bad)} = {host[bad][0]:.6g} is outside [{pixel_range[0]:g}, '
    f'{pixel_range[1]:g}]; expected pixel values in that range{hint}'
  )


def check_labels(labels: Any, num_classes: int | None, name: str = 'labels', *, n=None) -> None:
  """Raises `InvalidInput` unless `labels` is a 1-D integer array with values in [0, K).

  Args:
    labels: (N,) array (a tracer is not checked).
    num_classes: K; None checks only that labels are >= 0.
    name: the argument's name in messages.
    n: the required length (the number of images), or None.
  """
  if _traced(labels):
    return
  shape, dtype = np.shape(labels), np.result_type(labels)
  if len(shape) != 1 or not np.issubdtype(dtype, np.integer):
    raise InvalidInput(f'{name} must be integers of shape (N,); got {dtype} of shape {shape}')
  if n is not None and shape[0] != n:
    raise InvalidInput(f'{name} has {shape[0]} entries for {n} images')
  host = np.asarray(labels)
  if not host.size:
    return
  hi = num_classes if num_classes is not None else np.iinfo(dtype).max
  bad = (host < 0) | (host >= hi)
  if bad.any():
    i = int(np.argmax(bad))
    if num_classes is None:
      raise InvalidInput(f'{name}[{i}] = {host[i]} is negative; expected a class index >= 0')
    raise InvalidInput(
      f'{name}[{i}] = {host[i]} is outside [0, {num_classes}); expected a class index'
    )


def check_params(params: Any, name: str = 'params') -> None:
  """Raises `InvalidInput` unless every leaf of `params` is a finite float array (on the host,
  before a jit: a nan parameter would otherwise only give nan results)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if _traced(leaf):
      continue
    where = f'{name}{jax.tree_util.keystr(path)}'
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise InvalidInput(f'{where} has dtype {jnp.result_type(leaf)}; expected a float array')
    with jax.ensure_compile_time_eval():  # concrete values closed over inside a user's jit
      finite = bool(jnp.all(jnp.isfinite(leaf)))
    if not finite:
      raise InvalidInput(f'{where} has non-finite values (nan or inf)')


def num_outputs(logits_fn, images) -> int:
  """K, the number of logits `logits_fn` returns for one image (traced, not run)."""
  one = jax.ShapeDtypeStruct((1, *np.shape(images)[1:]), jnp.float32)
  return int(jax.eval_shape(logits_fn, one).shape[-1])


def check_labels_for(logits_fn, images, labels, name: str = 'labels') -> None:
  """`check_labels` against the K logits of `logits_fn` and the number of images."""
  if not _traced(labels):
    check_labels(labels, num_outputs(logits_fn, images), name, n=np.shape(images)[0])
