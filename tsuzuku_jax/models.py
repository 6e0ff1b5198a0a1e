"""The library's models: plain Flax linen modules, `(images, *, train) -> logits`.

Nothing here knows about Lipschitz bounds: `tsuzuku_jax.lmt.analysis` reads any model's jaxpr, so
these are ordinary models that LMT certifies and trains like a user's own. Inputs are NHWC
images in [0, 1]; a per-channel standardisation by constants (`mean`, `std`) is part of the
model (and of its analysis), so every radius is in pixel units. Batch norm uses batch
statistics with `train=True` and running ones otherwise (the function that is certified).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
from jax.interpreters import batching, mlir

# Spatial padding of a 2-D conv: a lax padding string or two (lo, hi) pairs.
Padding = str | Sequence[tuple[int, int]]


def conv_pads(
  in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding
) -> tuple[tuple[int, int], ...]:
  """Explicit ((lo, hi), (lo, hi)) spatial padding, as `lax.conv_general_dilated` uses it."""
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding))
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f'padding must give two (lo, hi) pairs, got {padding!r}')
  return pads


_he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _stem(x: jax.Array, mean, std) -> jax.Array:
  """Checks the input and applies the optional standardisation by constants."""
  if x.ndim != 4:
    raise ValueError(f'models take NHWC images in [0, 1]; got an array of shape {x.shape}')
  if mean is not None:
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x


class MLP(nn.Module):
  """Flatten, Dense-ReLU blocks (with dropout after each when training, if `dropout` > 0),
  linear head."""

  num_classes: int = 10
  hidden: Sequence[int] = (256, 256)
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = _stem(x, self.mean, self.std)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f'dense{i}')(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)


ACTIVATIONS = ('relu', 'minmax')


def _pairs(x: jax.Array) -> jax.Array:
  return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)


def _minmax_impl(x: jax.Array) -> jax.Array:
  p = _pairs(x)
  lo, hi = jnp.minimum(p[..., 0], p[..., 1]), jnp.maximum(p[..., 0], p[..., 1])
  return jnp.stack([lo, hi], -1).reshape(x.shape)


def _minmax_batch(args, dims):
  (x,), (d,) = args, dims
  return minmax_p.bind(jnp.moveaxis(x, d, 0)), 0  # the last axis stays last


# One primitive for the whole pair sort, so that the Lipschitz analysis bounds it by 1 as a sort
# (a max and a min of two branches would be bounded separately, 2x looser), computed with
# max/min: XLA:CPU's general sort is 150x slower on pairs.
minmax_p = jex.core.Primitive('minmax')
minmax_p.def_impl(_minmax_impl)
minmax_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(minmax_p, mlir.lower_fun(_minmax_impl, multiple_results=False))
batching.primitive_batchers[minmax_p] = _minmax_batch


@jax.custom_jvp
def minmax(x: jax.Array) -> jax.Array:
  """MinMax (GroupSort with groups of 2): sorts each pair of channels (last axis), the pair's
  minimum first. Gradient-norm preserving; the analysis bounds it by 1 (a sort)."""
  if x.shape[-1] % 2:
    raise ValueError(f'minmax sorts channel pairs: got {x.shape[-1]} channels (odd)')
  return minmax_p.bind(x)


@minmax.defjvp
def _minmax_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  p, tp = _pairs(x), _pairs(t)
  swap = (p[..., 0] > p[..., 1])[..., None]  # the pair is reordered: so is its tangent
  return minmax(x), jnp.where(swap, tp[..., ::-1], tp).reshape(t.shape)


def activation_fn(name: str):
  """'relu' | 'minmax' -> the function."""
  if name not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {ACTIVATIONS}, got {name!r}')
  return nn.relu if name == 'relu' else minmax


class CNN(nn.Module):
  """Small CNN: [conv(-BN)-activation(-maxpool)] per stage, a dense layer, a linear head.

  With `strides` 1 each stage ends with a 2x2 max pooling; with `strides` > 1 the conv itself
  downsamples ('SAME' padding, no pooling), as GloRo's 2C2F (channels 16, 32, kernel 4,
  strides 2, dense 100, minmax) does. `activation` 'relu' or 'minmax' (GroupSort 2)."""

  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  dense: int = 128
  batch_norm: bool = True
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  activation: str = 'relu'
  kernel: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = activation_fn(self.activation)
    x = _stem(x, self.mean, self.std)
    for i, c in enumerate(self.channels):
      k, st = (self.kernel, self.kernel), (self.strides, self.strides)
      bias = not self.batch_norm
      conv = nn.Conv(c, k, st, use_bias=bias, kernel_init=_he_normal, name=f'conv{i}')
      x = conv(x)
      if self.batch_norm:
        x = _batch_norm(train, f'bn{i}')(x)
      x = act(x)
      if self.strides == 1 and x.shape[1] >= 2 and x.shape[2] >= 2:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(self.dense, name='dense')(x))
    return nn.Dense(self.num_classes, name='head')(x)


class WideBlock(nn.Module):
  """Pre-activation wide residual block (BN-ReLU-conv-BN-ReLU-conv, projection shortcut)."""

  features: int
  strides: tuple[int, int] = (1, 1)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_he_normal)
    o = nn.relu(_batch_norm(train, 'bn1')(x))
    if x.shape[-1] != self.features or self.strides != (1, 1):
      shortcut = conv(self.features, (1, 1), self.strides, name='shortcut')(o)
    else:
      shortcut = x
    b = conv(self.features, (3, 3), self.strides, name='conv1')(o)
    b = nn.relu(_batch_norm(train, 'bn2')(b))
    b = nn.Dropout(self.dropout, deterministic=not train)(b)
    b = conv(self.features, (3, 3), name='conv2')(b)
    return b + shortcut


class WideResNet(nn.Module):
  """WRN-depth-width (Zagoruyko & Komodakis), pre-activation; WRN-16-4 by default."""

  num_classes: int = 10
  depth: int = 16
  width: int = 4
  dropout: float = 0.0
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}')
    n = (self.depth - 4) // 6
    x = _stem(x, self.mean, self.std)
    x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=_he_normal, name='stem')(x)
    for g, c in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for i in range(n):
        strides = (2, 2) if g > 0 and i == 0 else (1, 1)
        x = WideBlock(c, strides, self.dropout, name=f'group{g}_block{i}')(x, train=train)
    x = nn.relu(_batch_norm(train, 'bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


class LiResNet(nn.Module):
  """A LiResNet-style network (Hu et al., 2023): a conv stem, `depth` linear residual blocks
  act(x + conv(x)) (stride 1, same channels: the analysis bounds each block as the one
  convolution whose kernel has the identity added at its centre tap, ||I + W|| rather than
  1 + ||W||), a strided conv neck, a dense layer and a linear head. `activation` 'minmax'
  sorts channel pairs (MinMax / GroupSort 2, gradient-norm preserving) or 'relu'."""

  num_classes: int = 10
  width: int = 32
  depth: int = 4
  neck: int = 64
  dense: int = 128
  activation: str = 'minmax'
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  def _act(self, x: jax.Array) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"LiResNet activation must be 'minmax' or 'relu', got {self.activation!r}")
    return activation_fn(self.activation)(x)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    x = _stem(x, self.mean, self.std)
    x = self._act(nn.Conv(self.width, (3, 3), kernel_init=_he_normal, name='stem')(x))
    for i in range(self.depth):
      # Small initial branches: each block starts near the identity (as LiResNet does).
      init = nn.initializers.variance_scaling(0.1, 'fan_in', 'normal')
      x = self._act(x + nn.Conv(self.width, (3, 3), kernel_init=init, name=f'block{i}')(x))
    neck = nn.Conv(self.neck, (4, 4), strides=(2, 2), kernel_init=_he_normal, name='neck')
    x = self._act(neck(x))
    x = x.reshape(x.shape[0], -1)
    x = self._act(nn.Dense(self.dense, name='dense')(x))
    return nn.Dense(self.num_classes, name='head')(x)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """'mlp' | 'cnn' | 'wrn' | 'liresnet' -> model instance (kwargs go to the dataclass)."""
  models = {'mlp': MLP, 'cnn': CNN, 'wrn': WideResNet, 'liresnet': LiResNet}
  if name not in models:
    raise ValueError(f'unknown model {name!r}; expected one of {sorted(models)}')
  return models[name](num_classes=num_classes, **kwargs)
