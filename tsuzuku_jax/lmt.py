"""Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018) and certification.

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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsuzuku_jax import attacks, checks
from tsuzuku_jax.models import LipBounds

FORMS = ('global', 'pairwise')
VARIANTS = ('lmt', 'gloro')


def pairwise_bounds(bounds: LipBounds, form: str) -> jax.Array:
  """(K, K) matrix whose (i, j) entry bounds the Lipschitz constant of z_i - z_j.

  Guarantee: sound when `bounds` comes from the 'certificate' mode; an estimate otherwise.
  The diagonal is meaningless (it is never used).
  """
  k = bounds.head_pairwise.shape[-1]
  if form == 'global':
    return jnp.sqrt(2.0) * bounds.below * bounds.head_norm * jnp.ones((k, k), jnp.float32)
  if form == 'pairwise':
    return bounds.below * bounds.head_pairwise
  raise ValueError(f'form must be one of {FORMS}, got {form!r}')


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
  bounds: LipBounds,
  c,
  *,
  form: str = 'pairwise',
  variant: str = 'lmt',
  clip: bool = False,
) -> jax.Array:
  """Mean Lipschitz-margin cross-entropy; differentiable through the bounds."""
  pair_lip = pairwise_bounds(bounds, form)
  if variant == 'lmt':
    z = margin_logits(logits, labels, pair_lip, c, clip=clip)
  elif variant == 'gloro':
    z = gloro_logits(logits, labels, pair_lip, c)
  else:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))


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


def certificate_bounds(
  apply_fn: Callable, variables, input_shape: Sequence[int], *, mode: str = 'certificate'
) -> LipBounds:
  """Runs a model of `tsuzuku_jax.models` once in a bound mode; returns its LipBounds.

  The bounds do not depend on the input, so one call (on zeros of one example) serves a whole
  test set. `apply_fn(variables, x, train=False, mode=...)` -> (logits, LipBounds).
  """
  x = jnp.zeros((1, *input_shape), jnp.float32)
  _, bounds = jax.jit(functools.partial(apply_fn, train=False, mode=mode))(variables, x)
  return bounds


def certify_dataset(
  logits_fn: Callable[[jax.Array], jax.Array],
  bounds: LipBounds,
  images: np.ndarray,
  labels: np.ndarray,
  eps: Sequence[float],
  *,
  batch_size: int = 500,
) -> dict:
  """Certified radii and certified accuracy at each eps, for both forms.

  Args:
    logits_fn: images (B, H, W, C) -> logits (B, K); evaluate it at full float32 precision
      (e.g. under `jax.default_matmul_precision('highest')` on GPUs) for the radii to hold.
    bounds: certificate-mode `LipBounds` (see `certificate_bounds`).
    images, labels: the test set.
    eps: radii at which to report certified accuracy.
    batch_size: evaluation batch.

  Raises:
    InvalidInput: non-finite images, or labels outside [0, K) or of another length.

  Returns:
    dict with 'pred' (N,), 'correct' (N,), and per form: 'radius_<form>' (N,),
    'certified_accuracy_<form>' (E,), 'median_radius_<form>' (median over the test set of the
    radius, counted 0 for misclassified points, as in LMT).
  """
  checks.check_images(images, pixel_range=None, ndim=None)
  k = bounds.head_pairwise.shape[-1]
  checks.check_labels(labels, k, n=np.shape(images)[0])
  logits_fn = jax.jit(logits_fn)
  preds, radii = [], {f: [] for f in FORMS}
  lips = {f: pairwise_bounds(bounds, f) for f in FORMS}
  radius_fn = jax.jit(certified_radius)
  for i in range(0, len(images), batch_size):
    logits = logits_fn(jnp.asarray(images[i : i + batch_size]))
    for f in FORMS:
      pred, r = radius_fn(logits, lips[f])
      radii[f].append(np.asarray(r))
    preds.append(np.asarray(pred))
  pred = np.concatenate(preds)
  correct = pred == np.asarray(labels)
  out = {'pred': pred, 'correct': correct, 'eps': np.asarray(eps, np.float32)}
  for f in FORMS:
    r = np.concatenate(radii[f])
    out[f'radius_{f}'] = r
    out[f'certified_accuracy_{f}'] = np.asarray(certified_accuracy(pred, r, labels, eps))
    out[f'median_radius_{f}'] = float(np.median(np.where(correct, r, 0.0)))
  return out


def layer_report(apply_fn: Callable, variables, input_shape: Sequence[int]) -> dict:
  """Per-layer bounds in the 'estimate', 'converged' and 'certificate' modes.

  Returns:
    {layer path: {'estimate': one power-iteration step from the stored iterate,
                  'converged': CONVERGED_ITERS steps (a tight lower bound),
                  'certificate': the sound upper bound}}, from the `lip_report` collection.
  """
  x = jnp.zeros((1, *input_shape), jnp.float32)
  out = {}
  for mode in ('estimate', 'converged', 'certificate'):
    fn = functools.partial(apply_fn, train=False, mode=mode, mutable=['lip_report'])
    _, sown = jax.jit(fn)(variables, x)
    flat = jax.tree_util.tree_flatten_with_path(sown['lip_report'])[0]
    for path, value in flat:
      keys = [str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path]
      name = '/'.join(k for k in keys if k != 'sigma' and not k.isdigit())
      out.setdefault(name, {})[mode] = float(value)
  return out


def robustness_report(
  logits_fn: Callable[[jax.Array], jax.Array],
  bounds: LipBounds,
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
  cert = certify_dataset(logits_fn, bounds, images, labels, eps, batch_size=batch_size)
  n = min(attack_examples, len(images))
  x, y = images[:n], labels[:n]
  fn = jax.jit(logits_fn)
  keys = jax.random.split(key, len(eps) + len(FORMS))
  pgd = {
    f'{e:g}': float(
      attacks.robust_accuracy_batched(fn, x, y, e, key=k, batch_size=batch_size, **pgd_kwargs)
    )
    for e, k in zip(eps, keys, strict=False)
  }
  violations, checked = {}, {}
  for f, k in zip(FORMS, keys[len(eps) :], strict=True):
    radius = np.where(np.isfinite(cert[f'radius_{f}'][:n]), cert[f'radius_{f}'][:n], 1e6)
    certified = cert['correct'][:n] & (radius > 0)
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
    'clean_accuracy': float(cert['correct'].mean()),
    'certified_accuracy': {
      f: {f'{e:g}': float(a) for e, a in zip(eps, cert[f'certified_accuracy_{f}'], strict=True)}
      for f in FORMS
    },
    'median_radius': {f: cert[f'median_radius_{f}'] for f in FORMS},
    'pgd_robust_accuracy': pgd,
    'violations': violations,
    'certified_checked': checked,
    'attack_examples': n,
    '_radius': {f: cert[f'radius_{f}'] for f in FORMS},
    '_correct': cert['correct'],
  }
