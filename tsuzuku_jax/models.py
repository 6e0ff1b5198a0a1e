"""Flax linen models whose forward pass carries an L2 Lipschitz bound beside the activations.

Every layer takes and returns `(x, lip)`: `lip` bounds the Lipschitz constant of the map from
the network input to `x`. Chains multiply it, residual merges add the two branches' bounds
(triangle inequality), exactly as the original LMT code did. The last linear layer (`LipHead`)
returns the logits and a `LipBounds` from which `lmt.py` builds the pairwise bounds of logit
differences. Inputs are in [0, 1] pixel space; a normalisation layer is part of the model and
of the bound, so every radius is in pixel units.

The bound `mode` is chosen per call:
  'none'        no bound work at all (plain training; the returned bounds are meaningless),
  'estimate'    one power-iteration step per linear layer (the LMT training estimate,
                differentiable in the weights; with `train=True` the iterates are updated in the
                mutable `lipschitz` collection),
  'converged'   CONVERGED_ITERS power-iteration steps from the stored iterate (a tight lower
                bound, for reports),
  'certificate' a provably sound upper bound per layer (`lipschitz.*_certificate`).
Per-layer values are sown into the `lip_report` collection when it is mutable.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsuzuku_jax import lipschitz

MODES = ('none', 'estimate', 'converged', 'certificate')
CONVERGED_ITERS = 500
_he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class LipBounds(NamedTuple):
  """What the head needs to bound logit differences (see `lmt.pairwise_bounds`)."""

  below: jax.Array  # shape=(), Lipschitz bound of input -> features entering the head.
  head_norm: jax.Array  # shape=(), ||W_head||_2 (estimate or certificate, by mode).
  head_pairwise: jax.Array  # shape=(K, K), ||w_i - w_j||_2 of the head's columns.


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


def layer_bound(
  module: nn.Module,
  op: Callable[[jax.Array], jax.Array],
  in_shape: Sequence[int],
  *,
  mode: str,
  train: bool,
  certificate: Callable[[], jax.Array],
) -> jax.Array:
  """Bound of one linear operator `op` in the given mode (see module docstring).

  The power-iteration vector lives in `module`'s `lipschitz` collection as `u`, shaped like one
  input example; it is only touched in the 'estimate' and 'converged' modes.
  """
  _check_mode(mode)
  if mode == 'none':
    return jnp.ones((), jnp.float32)
  if mode == 'certificate':
    sigma = certificate()
  else:

    def init_u():
      u = jax.random.normal(module.make_rng('params'), tuple(in_shape), jnp.float32)
      return u / jnp.linalg.norm(u)

    u = module.variable('lipschitz', 'u', init_u)
    if mode == 'estimate':
      sigma, u_next = lipschitz.power_iteration_step(op, u.value)
      if train and module.is_mutable_collection('lipschitz') and not module.is_initializing():
        u.value = u_next
    else:
      sigma, _ = lipschitz.power_iteration(op, u.value, CONVERGED_ITERS)
  if not module.is_initializing():
    module.sow('lip_report', 'sigma', sigma)
  return sigma


class BatchNorm(nn.Module):
  """Batch norm that returns its per-channel affine map (scale, shift), so that the layer
  before it can be bounded jointly with it. Batch statistics in training, running ones at
  evaluation (then the map is fixed and the bound is exact)."""

  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    c = x.shape[-1]
    gamma = self.param('scale', nn.initializers.ones, (c,))
    beta = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    else:
      mean, var = ra_mean.value, ra_var.value
    scale = gamma * jax.lax.rsqrt(var + self.epsilon)
    return scale, beta - mean * scale


class LipDense(nn.Module):
  """Dense layer x @ W + b; bound ||W||_2."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, lip, *, train: bool = False, mode: str = 'estimate'):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    op = lambda v: v @ kernel
    y = op(x)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    sigma = layer_bound(
      self,
      op,
      (1, x.shape[-1]),
      mode=mode,
      train=train,
      certificate=lambda: lipschitz.dense_certificate(kernel),
    )
    return y, lip * sigma


class LipConv(nn.Module):
  """2-D convolution (NHWC), optionally followed by batch norm bounded jointly with it."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: lipschitz.Padding = 'SAME'
  use_bias: bool = True
  batch_norm: bool = False
  kernel_init: Callable = _he_normal

  @nn.compact
  def __call__(self, x, lip, *, train: bool = False, mode: str = 'estimate'):
    if x.ndim != 4:
      raise ValueError(f'{self.name}: expected NHWC input, got shape {x.shape}')
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape)
    pads = lipschitz.conv_pads(x.shape[1:3], self.kernel_size, self.strides, self.padding)

    def conv(v):
      return jax.lax.conv_general_dilated(
        v, kernel, self.strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )

    y = conv(x)
    scale = None
    if self.batch_norm:
      scale, shift = BatchNorm(name='bn')(y, train=train)
      y = y * scale + shift
      op = lambda v: conv(v) * scale
    else:
      op = conv
      if self.use_bias:
        y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    sigma = layer_bound(
      self,
      op,
      (1, *x.shape[1:]),
      mode=mode,
      train=train,
      certificate=lambda: lipschitz.conv_certificate(
        kernel, x.shape[1:3], self.strides, pads, scale
      ),
    )
    return y, lip * sigma


class LipBatchNorm(nn.Module):
  """Stand-alone batch norm; bound max_c |gamma_c / sqrt(var_c + eps)| (exact, diagonal)."""

  @nn.compact
  def __call__(self, x, lip, *, train: bool = False, mode: str = 'estimate'):
    _check_mode(mode)
    scale, shift = BatchNorm(name='bn')(x, train=train)
    sigma = jnp.max(jnp.abs(scale))
    if mode != 'none' and not self.is_initializing():
      self.sow('lip_report', 'sigma', sigma)
    return x * scale + shift, lip * sigma


class Normalize(nn.Module):
  """(x - mean) / std with fixed per-channel statistics; bound max_c 1 / std_c."""

  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x, lip):
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x - mean) / std, lip * jnp.max(1.0 / std)


def max_pool(x, lip, window=(2, 2), strides=None, padding='VALID'):
  """Max pooling with its Lipschitz factor (`lipschitz.max_pool_factor`)."""
  strides = tuple(strides or window)
  factor = lipschitz.max_pool_factor(x.shape[1:3], window, strides, padding)
  return nn.max_pool(x, tuple(window), strides, padding), lip * factor


def avg_pool(x, lip, window=(2, 2), strides=None, padding='VALID'):
  """Average pooling with its Lipschitz factor (`lipschitz.avg_pool_factor`)."""
  strides = tuple(strides or window)
  factor = lipschitz.avg_pool_factor(x.shape[1:3], window, strides, padding)
  return nn.avg_pool(x, tuple(window), strides, padding), lip * factor


def global_avg_pool(x, lip):
  """Mean over H, W: exactly 1/sqrt(H W)-Lipschitz."""
  return jnp.mean(x, axis=(1, 2)), lip / jnp.sqrt(float(x.shape[1] * x.shape[2]))


class LipHead(nn.Module):
  """Last linear layer: returns (logits, LipBounds)."""

  num_classes: int

  @nn.compact
  def __call__(self, x, lip, *, train: bool = False, mode: str = 'estimate'):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    op = lambda v: v @ kernel
    logits = op(x) + bias
    norm = layer_bound(
      self,
      op,
      (1, x.shape[-1]),
      mode=mode,
      train=train,
      certificate=lambda: lipschitz.dense_certificate(kernel),
    )
    if mode == 'certificate':
      pairwise = lipschitz.pairwise_row_certificate(kernel)
    else:
      pairwise = lipschitz.pairwise_row_norms(kernel)
    return logits, LipBounds(jnp.asarray(lip, jnp.float32), norm, pairwise)


def _stem(x: jax.Array, mean, std) -> tuple[jax.Array, jax.Array]:
  """Checks the input and starts the bound at 1 (after the optional normalisation)."""
  if x.ndim != 4:
    raise ValueError(f'models take NHWC images in [0, 1]; got an array of shape {x.shape}')
  lip = jnp.ones((), jnp.float32)
  if mean is not None:
    return Normalize(mean, std)(x, lip)
  return x, lip


class MLP(nn.Module):
  """Flatten, Dense-ReLU blocks, linear head."""

  num_classes: int = 10
  hidden: Sequence[int] = (256, 256)
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False, mode: str = 'estimate'):
    x, lip = _stem(x, self.mean, self.std)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x, lip = LipDense(h, name=f'dense{i}')(x, lip, train=train, mode=mode)
      x = nn.relu(x)
    return LipHead(self.num_classes, name='head')(x, lip, train=train, mode=mode)


class CNN(nn.Module):
  """Small CNN: [conv(-BN)-ReLU-maxpool] per stage, a dense ReLU layer, a linear head."""

  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  dense: int = 128
  batch_norm: bool = True
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False, mode: str = 'estimate'):
    x, lip = _stem(x, self.mean, self.std)
    for i, c in enumerate(self.channels):
      conv = LipConv(c, batch_norm=self.batch_norm, use_bias=not self.batch_norm, name=f'conv{i}')
      x, lip = conv(x, lip, train=train, mode=mode)
      x = nn.relu(x)
      if x.shape[1] >= 2 and x.shape[2] >= 2:
        x, lip = max_pool(x, lip)
    x = x.reshape(x.shape[0], -1)
    x, lip = LipDense(self.dense, name='dense')(x, lip, train=train, mode=mode)
    x = nn.relu(x)
    return LipHead(self.num_classes, name='head')(x, lip, train=train, mode=mode)


class WideBlock(nn.Module):
  """Pre-activation wide residual block; the two branch bounds add at the merge."""

  features: int
  strides: tuple[int, int] = (1, 1)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, lip, *, train: bool = False, mode: str = 'estimate'):
    kw = dict(train=train, mode=mode)
    o, lip_o = LipBatchNorm(name='bn1')(x, lip, **kw)
    o = nn.relu(o)
    if x.shape[-1] != self.features or self.strides != (1, 1):
      short = LipConv(self.features, (1, 1), self.strides, use_bias=False, name='shortcut')
      sc, lip_sc = short(o, lip_o, **kw)
    else:
      sc, lip_sc = x, lip
    conv1 = LipConv(
      self.features, (3, 3), self.strides, use_bias=False, batch_norm=True, name='conv1'
    )
    b, lip_b = conv1(o, lip_o, **kw)
    b = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(b))
    b, lip_b = LipConv(self.features, (3, 3), use_bias=False, name='conv2')(b, lip_b, **kw)
    return b + sc, lip_b + lip_sc


class WideResNet(nn.Module):
  """WRN-depth-width (Zagoruyko & Komodakis), pre-activation; WRN-16-4 by default."""

  num_classes: int = 10
  depth: int = 16
  width: int = 4
  dropout: float = 0.0
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False, mode: str = 'estimate'):
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}')
    n = (self.depth - 4) // 6
    x, lip = _stem(x, self.mean, self.std)
    kw = dict(train=train, mode=mode)
    x, lip = LipConv(16, use_bias=False, name='stem')(x, lip, **kw)
    for g, c in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for i in range(n):
        strides = (2, 2) if g > 0 and i == 0 else (1, 1)
        block = WideBlock(c, strides, self.dropout, name=f'group{g}_block{i}')
        x, lip = block(x, lip, **kw)
    x, lip = LipBatchNorm(name='bn')(x, lip, **kw)
    x, lip = global_avg_pool(nn.relu(x), lip)
    return LipHead(self.num_classes, name='head')(x, lip, **kw)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """'mlp' | 'cnn' | 'wrn' -> model instance (kwargs go to the dataclass)."""
  models = {'mlp': MLP, 'cnn': CNN, 'wrn': WideResNet}
  if name not in models:
    raise ValueError(f'unknown model {name!r}; expected one of {sorted(models)}')
  return models[name](num_classes=num_classes, **kwargs)
