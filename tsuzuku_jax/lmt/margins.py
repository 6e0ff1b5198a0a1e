"""LMT's training losses: margin-augmented logits (Tsuzuku, Sato & Sugiyama, NeurIPS 2018) and
the GloRo variant (Leino et al., 2021), on the pairwise bounds of a `Certificate` or an
`Estimate`.

If every logit difference z_y - z_i is L_yi-Lipschitz in the input (L2), no perturbation of
norm below (z_y - z_i) / L_yi can make class i overtake y. LMT trains with logits in which
every wrong class i is raised by c * L_yi, so the network learns margins that certify a radius
of c. Two forms of L_yi (`pairwise_bounds`):

  'global'    sqrt(2) * L, L the bound of the whole network (the paper's Proposition 1),
  'pairwise'  L_below * ||w_y - w_i||, L_below the bound of everything below the last linear
              layer (Proposition 2, "LMT++", which the released configs used; GloRo, SLL and
              LiResNet use the same head bound).

Loss variants: 'lmt' (margin-augmented cross-entropy, optionally with the released code's
clipping) and 'gloro' (one extra logit max_{i != y} z_i + c L_yi).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsuzuku_jax import train_lib
from tsuzuku_jax.lmt.analysis import Certificate, Estimate, estimate, init_iterates
from tsuzuku_jax.lmt.bounds import round_up

FORMS = ('global', 'pairwise')
VARIANTS = ('lmt', 'gloro')


def pairwise_bounds(bounds: Certificate | Estimate, form: str) -> jax.Array:
  """(K, K) matrix whose (i, j) entry bounds the Lipschitz constant of z_i - z_j.

  'global' is sqrt(2) * L, L the bound of the whole logit map; 'pairwise' the analysis'
  pairwise bounds (the last segment's row differences, LMT's Proposition 2).
  Guarantee: sound (rounded up) for a `Certificate`; an estimate for an `Estimate`. The
  diagonal is meaningless (it is never used).
  """
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  if isinstance(bounds, Certificate):
    if form == 'pairwise':
      return jnp.asarray(bounds.pairwise)
    k = bounds.pairwise.shape[-1]
    glob = round_up(np.float64(bounds.lipschitz) * np.sqrt(2.0) * (1 + 1e-15))
    return jnp.full((k, k), glob, jnp.float32)
  if not isinstance(bounds, Estimate):
    raise TypeError(f'bounds must be a Certificate or an Estimate, got {type(bounds).__name__}')
  if form == 'pairwise':
    return bounds.pairwise
  k = bounds.pairwise.shape[-1]
  return jnp.sqrt(2.0) * bounds.lipschitz * jnp.ones((k, k), jnp.float32)


def margin_logits(
  logits: jax.Array, labels: jax.Array, pair_lip: jax.Array, c, *, clip: bool = False
) -> jax.Array:
  """LMT's margin-augmented logits: z_i + c * L_yi for every i != y.

  Args:
    logits: (B, K).
    labels: (B,) int.
    pair_lip: (K, K) from `pairwise_bounds`.
    c: scalar margin scale (the radius the training aims to certify).
    clip: the released code's variant: the added amount is scaled by
      clip(min_{i != y} (z_y - z_i) / (c L_yi), 0, 1), held constant in the gradient, so a
      misclassified example gets no margin and no example is pushed past its own margin.

  Returns:
    (B, K) augmented logits.
  """
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  add = c * pair_lip[labels] * (1.0 - onehot)
  if clip:
    gap = jnp.sum(logits * onehot, -1, keepdims=True) - logits
    ratio = jnp.where(onehot > 0, jnp.inf, gap / jnp.maximum(add, 1e-12))
    factor = jax.lax.stop_gradient(jnp.clip(jnp.min(ratio, -1, keepdims=True), 0.0, 1.0))
    add = factor * add
  return logits + add


def gloro_logits(logits: jax.Array, labels: jax.Array, pair_lip: jax.Array, c) -> jax.Array:
  """(B, K + 1) logits with GloRo's extra 'bottom' logit max_{i != y} z_i + c L_yi."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  raised = logits + c * pair_lip[labels]
  bottom = jnp.max(jnp.where(onehot, -jnp.inf, raised), -1, keepdims=True)
  return jnp.concatenate([logits, bottom], -1)


def lmt_loss(
  logits: jax.Array,
  labels: jax.Array,
  bounds: Estimate,
  c,
  *,
  form: str = 'pairwise',
  variant: str = 'lmt',
  clip: bool = False,
) -> jax.Array:
  """Mean Lipschitz-margin cross-entropy; differentiable through the bounds (an `Estimate`
  in training; a `Certificate` also works, as a constant)."""
  pair_lip = pairwise_bounds(bounds, form)
  if variant == 'lmt':
    z = margin_logits(logits, labels, pair_lip, c, clip=clip)
  elif variant == 'gloro':
    z = gloro_logits(logits, labels, pair_lip, c)
  else:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')
  return train_lib.cross_entropy(z, labels)


def make_loss(
  apply_fn: Callable,
  input_shape: Sequence[int],
  *,
  form: str = 'pairwise',
  variant: str = 'lmt',
  clip: bool = False,
) -> Callable:
  """The LMT training loss of a model, from the analysis of `apply_fn` (evaluation mode).

  Returns:
    `loss(variables, iterates, logits, labels, c) -> (loss, (next iterates, Estimate))`:
    `logits` are the training forward pass's (e.g. with batch statistics), `iterates` from
    `init_iterates`; the bounds are estimated on `apply_fn(variables, .)` and the loss is
    differentiable in `variables` through both.
  """
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')
  shape = tuple(input_shape)

  def loss(variables, iterates, logits, labels, c):
    bounds, iterates = estimate(apply_fn, variables, iterates, shape)
    value = lmt_loss(logits, labels, bounds, c, form=form, variant=variant, clip=clip)
    return value, (iterates, bounds)

  return loss


def training_loss(
  apply_fn: Callable,
  input_shape: Sequence[int],
  *,
  c: float,
  c_warmup_steps: int = 0,
  form: str = 'pairwise',
  variant: str = 'lmt',
  clip: bool = False,
) -> train_lib.Loss:
  """LMT as the trainer's loss: `make_loss` with `c` ramped over `c_warmup_steps`
  (`c_schedule`) and the power-iteration vectors as the loss' state; logs `c` and
  `lipschitz_estimate` (the largest pairwise bound estimated this step)."""
  if not c > 0:
    raise ValueError(f'c must be positive for LMT, got {c} (train with the plain loss instead)')
  shape = tuple(input_shape)
  loss = make_loss(apply_fn, shape, form=form, variant=variant, clip=clip)
  schedule = c_schedule(c, c_warmup_steps)

  def fn(variables, iterates, logits, labels, step):
    c_now = schedule(step)
    value, (iterates, bounds) = loss(variables, iterates, logits, labels, c_now)
    lip = jnp.max(pairwise_bounds(bounds, form))
    return value, (iterates, {'c': c_now, 'lipschitz_estimate': lip})

  config = dict(c=c, c_warmup_steps=c_warmup_steps, form=form, variant=variant, clip=clip)
  init = lambda variables, key: init_iterates(apply_fn, variables, shape, key=key)  # noqa: E731
  return train_lib.Loss(fn, init, config, shown=('c',))


def c_schedule(c: float, warmup_steps: int, start: float = 1e-5) -> optax.Schedule:
  """c ramps linearly from `start` to `c` over `warmup_steps` (the released code's schedule)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(c)
  return optax.linear_schedule(min(start, c), c, warmup_steps)
