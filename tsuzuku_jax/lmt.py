"""Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018) and certification.

Any model `apply_fn(variables, images) -> logits` (a plain Flax model's `apply` in evaluation
mode, or any JAX function that treats examples independently) is certified and trained from
the same analysis of its jaxpr (`tsuzuku_jax.analysis`): `certificate` gives sound bounds (a
`Certificate`, reused across batches), `estimate` LMT's differentiable training estimate on the
same linear segments (an `Estimate`, which certifies nothing and is refused where a certificate
is required).

If every logit difference z_y - z_i is L_yi-Lipschitz in the input (L2), no perturbation of
norm below (z_y - z_i) / L_yi can make class i overtake y. LMT trains with logits in which
every wrong class i is raised by c * L_yi, so the network learns margins that certify a radius
of c. Two forms of L_yi (`pairwise_bounds`):

  'global'    sqrt(2) * L, L the bound of the whole network (the paper's Proposition 1),
  'pairwise'  L_below * ||w_y - w_i||, L_below the bound of everything below the last linear
              layer (Proposition 2, "LMT++", which the released configs used; GloRo, SLL and
              LiResNet use the same head bound).

Loss variants: 'lmt' (margin-augmented cross-entropy, optionally with the released code's
clipping) and 'gloro' (Leino et al., 2021: one extra logit max_{i != y} z_i + c L_yi).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsuzuku_jax import analysis, attacks, checks

# The analysis' entry points, under the names LMT users call: `certificate` (sound bounds,
# built once and reused for every batch), `init_iterates` and `estimate` (the training estimate).
from tsuzuku_jax.analysis import (
  Certificate,
  Estimate,
  UnsupportedOperation,
  certificate,
  estimate,
  init_iterates,
)

__all__ = ['Certificate', 'Estimate', 'UnsupportedOperation', 'certificate', 'estimate',
           'init_iterates']  # fmt: skip

FORMS = ('global', 'pairwise')
VARIANTS = ('lmt', 'gloro')
CONVERGED_ITERS = 500  # power-iteration steps of the 'converged' column of `segment_report`


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
    glob = analysis._round_up(np.float64(bounds.lipschitz) * np.sqrt(2.0) * (1 + 1e-15))
    return jnp.full((k, k), glob, jnp.float32)
  if not isinstance(bounds, Estimate):
    raise TypeError(f'bounds must be a Certificate or an Estimate, got {type(bounds).__name__}')
  if form == 'pairwise':
    return bounds.pairwise
  k = bounds.pairwise.shape[-1]
  return jnp.sqrt(2.0) * bounds.lipschitz * jnp.ones((k, k), jnp.float32)


def _require_certificate(cert) -> None:
  if not isinstance(cert, Certificate):
    raise TypeError(
      f'a Certificate (from lmt.certificate) is required, got {type(cert).__name__}: an '
      'estimate would give unsound radii'
    )


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
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))


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


def c_schedule(c: float, warmup_steps: int, start: float = 1e-5) -> optax.Schedule:
  """c ramps linearly from `start` to `c` over `warmup_steps` (the released code's schedule)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(c)
  return optax.linear_schedule(min(start, c), c, warmup_steps)


def certified_radius(logits: jax.Array, pair_lip: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Predicted class and the L2 radius within which it provably cannot change.

  Guarantee: if `pair_lip` holds sound bounds (from the 'certificate' mode) then for every
  ||delta||_2 < radius the network's prediction at x + delta equals `pred` (up to float32
  rounding of the logits). A tie for the top logit gives radius 0: a point on the decision
  boundary is never certified (cf. klasleino/gloro#9). A zero bound with a positive margin
  gives an infinite radius. Non-finite logits (or bounds) give radius 0: nothing is claimed.

  Args:
    logits: (B, K).
    pair_lip: (K, K).

  Returns:
    (pred (B,) int32, radius (B,) float32).
  """
  pred = jnp.argmax(logits, -1).astype(jnp.int32)
  top = jnp.take_along_axis(logits, pred[:, None], -1)
  gap = top - logits  # (B, K), >= 0
  lip = pair_lip[pred]
  ratio = jnp.where(lip > 0, gap / jnp.where(lip > 0, lip, 1.0), jnp.where(gap > 0, jnp.inf, 0.0))
  is_pred = jax.nn.one_hot(pred, logits.shape[-1], dtype=bool)
  radius = jnp.min(jnp.where(is_pred, jnp.inf, ratio), -1)
  finite = jnp.all(jnp.isfinite(logits), -1) & jnp.all(jnp.isfinite(lip) | is_pred, -1)
  return pred, jnp.where(finite, jnp.maximum(radius, 0.0), 0.0)


def certified_accuracy(
  pred: jax.Array, radius: jax.Array, labels: jax.Array, eps: jax.typing.ArrayLike
) -> jax.Array:
  """(E,) fraction of examples correctly classified with radius > eps, for each eps."""
  eps = jnp.asarray(eps, jnp.float32)
  ok = (pred == labels)[:, None] & (radius[:, None] > eps[None, :])
  return jnp.mean(ok.astype(jnp.float32), 0)


def certify(
  apply_fn: Callable,
  variables: Any,
  images: jax.typing.ArrayLike,
  cert: Certificate | None = None,
  *,
  form: str = 'pairwise',
) -> tuple[jax.Array, jax.Array]:
  """Predictions and certified L2 radii (pixel units) of `images` (NHWC in [0, 1]).

  Guarantee: no perturbation of L2 norm below `radius[b]` changes `pred[b]` (ties give 0),
  under the analysis' assumptions. Builds the certificate when `cert` is None (pass one from
  `certificate` to certify many batches: then each costs one forward pass).
  """
  images = jnp.asarray(images)
  if cert is None:
    cert = certificate(apply_fn, variables, images.shape[1:])
  _require_certificate(cert)
  return _radii(apply_fn, variables, images, [pairwise_bounds(cert, form)])[0]


@functools.partial(jax.jit, static_argnums=0)
def _radii(apply_fn, variables, images, pair_lips):
  """(pred, radius) per (K, K) bound matrix, from one forward pass."""
  logits = apply_fn(variables, images)
  return [certified_radius(logits, p) for p in pair_lips]


def certify_dataset(
  apply_fn: Callable,
  variables: Any,
  cert: Certificate,
  images: np.ndarray,
  labels: np.ndarray,
  eps: Sequence[float],
  *,
  batch_size: int = 500,
) -> dict:
  """Certified radii and certified accuracy at each eps, for both forms (one forward pass per
  batch; evaluate at full float32 precision, e.g. under
  `jax.default_matmul_precision('highest')` on GPUs, for the radii to hold).

  Raises:
    TypeError: `cert` is not a `Certificate`.
    InvalidInput: non-finite images, or labels outside [0, K) or of another length.

  Returns:
    dict with 'pred' (N,), 'correct' (N,), and per form: 'radius_<form>' (N,),
    'certified_accuracy_<form>' (E,), 'median_radius_<form>' (median over the test set of the
    radius, counted 0 for misclassified points, as in LMT).
  """
  _require_certificate(cert)
  checks.check_images(images, pixel_range=None, ndim=None)
  k = cert.pairwise.shape[-1]
  checks.check_labels(labels, k, n=np.shape(images)[0])
  preds, radii = [], {f: [] for f in FORMS}
  lips = [pairwise_bounds(cert, f) for f in FORMS]
  for i in range(0, len(images), batch_size):
    out = _radii(apply_fn, variables, jnp.asarray(images[i : i + batch_size]), lips)
    for f, (_, r) in zip(FORMS, out, strict=True):
      radii[f].append(np.asarray(r))
    preds.append(np.asarray(out[0][0]))
  pred = np.concatenate(preds)
  correct = pred == np.asarray(labels)
  out = {'pred': pred, 'correct': correct, 'eps': np.asarray(eps, np.float32)}
  for f in FORMS:
    r = np.concatenate(radii[f])
    out[f'radius_{f}'] = r
    out[f'certified_accuracy_{f}'] = np.asarray(certified_accuracy(pred, r, labels, eps))
    out[f'median_radius_{f}'] = float(np.median(np.where(correct, r, 0.0)))
  return out


def segment_report(cert: Certificate, *, key: jax.Array | None = None) -> list[dict]:
  """Per linear segment of a `Certificate`: where it ends (the source line of the
  nonlinearity that closes it), its shapes, the certificate, a converged power-iteration
  estimate (CONVERGED_ITERS steps: a lower bound on the segment's norm) and their ratio (the
  certificate's slack; 1 + 1e-6 for exactly bounded segments)."""
  _require_certificate(cert)
  key = jax.random.key(0) if key is None else key
  rows = []
  for i, seg in enumerate(cert.segments):
    conv = analysis.converged(seg, jax.random.fold_in(key, i), CONVERGED_ITERS)
    rows.append({
      'where': seg.where,
      'in_shape': list(seg.in_shape),
      'out_shape': list(seg.out_shape),
      'certificate': seg.bound,
      'converged': conv,
      'certificate_over_converged': seg.bound / max(conv, 1e-30),
      'exact': seg.exact,
    })  # fmt: skip
  return rows


def robustness_report(
  apply_fn: Callable,
  variables: Any,
  cert: Certificate,
  images: np.ndarray,
  labels: np.ndarray,
  eps: Sequence[float],
  *,
  key: jax.Array,
  attack_examples: int = 1000,
  batch_size: int = 500,
  **pgd_kwargs,
) -> dict:
  """Certified accuracy (both forms) beside PGD robust accuracy, and the soundness check.

  PGD runs on the first `attack_examples` test points: robust accuracy at each eps, and an
  attack inside each certified point's own certified radius for each form; a certified point
  broken inside its radius is a violation, and a sound certificate gives 0. Images must be
  finite pixel values in [0, 1] (PGD stays in that box).

  Returns:
    JSON-ready dict: clean_accuracy, certified_accuracy {form: {eps: acc}},
    median_radius {form: r}, pgd_robust_accuracy {eps: acc}, violations {form: count},
    certified_checked {form: number of certified points attacked}, attack_examples.
  """
  box = attacks.pixel_box(pgd_kwargs.get('clip_min', 0.0), pgd_kwargs.get('clip_max', 1.0))
  checks.check_images(images, ndim=None, pixel_range=box)
  result = certify_dataset(apply_fn, variables, cert, images, labels, eps, batch_size=batch_size)
  n = min(attack_examples, len(images))
  x, y = images[:n], labels[:n]
  fn = jax.jit(lambda z: apply_fn(variables, z))
  keys = jax.random.split(key, len(eps) + len(FORMS))
  pgd = {
    f'{e:g}': float(
      attacks.robust_accuracy_batched(fn, x, y, e, key=k, batch_size=batch_size, **pgd_kwargs)
    )
    for e, k in zip(eps, keys, strict=False)
  }
  violations, checked = {}, {}
  for f, k in zip(FORMS, keys[len(eps) :], strict=True):
    radius = np.where(np.isfinite(result[f'radius_{f}'][:n]), result[f'radius_{f}'][:n], 1e6)
    certified = result['correct'][:n] & (radius > 0)
    count = 0
    for i in range(0, n, batch_size):
      sl = slice(i, i + batch_size)
      count += int(
        attacks.count_violations(
          fn, x[sl], y[sl], radius[sl], certified[sl], key=jax.random.fold_in(k, i), **pgd_kwargs
        )
      )
    violations[f], checked[f] = count, int(certified.sum())
  return {
    'clean_accuracy': float(result['correct'].mean()),
    'certified_accuracy': {
      f: {f'{e:g}': float(a) for e, a in zip(eps, result[f'certified_accuracy_{f}'], strict=True)}
      for f in FORMS
    },
    'median_radius': {f: result[f'median_radius_{f}'] for f in FORMS},
    'pgd_robust_accuracy': pgd,
    'violations': violations,
    'certified_checked': checked,
    'attack_examples': n,
    '_radius': {f: result[f'radius_{f}'] for f in FORMS},
    '_correct': result['correct'],
  }
