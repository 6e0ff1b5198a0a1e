"""Certified radii: predictions and the L2 radius within which each provably cannot change,
from a `Certificate` (never an `Estimate`), over batches and datasets, with the PGD soundness
check and the per-segment tightness report."""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import attacks, checks, distributed, progress
from tsuzuku_jax.lmt import analysis
from tsuzuku_jax.lmt.analysis import Certificate, certificate
from tsuzuku_jax.lmt.margins import FORMS, pairwise_bounds

CONVERGED_ITERS = 500  # power-iteration steps of the 'converged' column of `segment_report`


def _require_certificate(cert) -> None:
  if not isinstance(cert, Certificate):
    raise TypeError(
      f'a Certificate (from lmt.certificate) is required, got {type(cert).__name__}: an '
      'estimate would give unsound radii'
    )


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


class FormRadii(NamedTuple):
  """One form's certified radii over a dataset."""

  radius: np.ndarray  # (N,) float32, L2, pixel units
  certified_accuracy: np.ndarray  # (E,) fraction correct with radius > eps
  median_radius: float  # over the test set, misclassified points counted 0 (as in LMT)


class Radii(NamedTuple):
  """`certify_dataset`'s answer: predictions and, per form of `FORMS`, the radii."""

  pred: np.ndarray  # (N,) int32
  correct: np.ndarray  # (N,) bool
  eps: np.ndarray  # (E,) float32
  forms: dict[str, FormRadii]  # 'global', 'pairwise'


def certify_dataset(
  apply_fn: Callable,
  variables: Any,
  cert: Certificate,
  images: np.ndarray,
  labels: np.ndarray,
  eps: Sequence[float],
  *,
  batch_size: int = 500,
  log: Callable[[str], None] = progress.print_on_process_0,
) -> Radii:
  """Certified radii and certified accuracy at each eps, for both forms (one forward pass per
  batch; evaluate at full float32 precision, e.g. under
  `jax.default_matmul_precision('highest')` on GPUs, for the radii to hold). `log`: progress.

  Raises:
    TypeError: `cert` is not a `Certificate`.
    InvalidInput: non-finite images, or labels outside [0, K) or of another length.
  """
  _require_certificate(cert)
  checks.check_images(images, pixel_range=None, ndim=None)
  k = cert.pairwise.shape[-1]
  checks.check_labels(labels, k, n=np.shape(images)[0])
  preds, radii = [], {f: [] for f in FORMS}
  lips = [pairwise_bounds(cert, f) for f in FORMS]
  starts = range(0, len(images), batch_size)
  bar = progress.Progress(f'certify ({len(images)} points)', len(starts), unit='batches', log=log)
  for j, i in enumerate(starts):
    out = _radii(apply_fn, variables, jnp.asarray(images[i : i + batch_size]), lips)
    for f, (_, r) in zip(FORMS, out, strict=True):
      radii[f].append(np.asarray(r))
    preds.append(np.asarray(out[0][0]))
    bar.update(j + 1)
  pred = np.concatenate(preds)
  correct = pred == np.asarray(labels)
  forms = {}
  for f in FORMS:
    r = np.concatenate(radii[f])
    acc = np.asarray(certified_accuracy(pred, r, labels, eps))
    forms[f] = FormRadii(r, acc, float(np.median(np.where(correct, r, 0.0))))
  return Radii(pred, correct, np.asarray(eps, np.float32), forms)


def segment_report(cert: Certificate, *, key: jax.Array) -> list[dict]:
  """Per linear segment of a `Certificate`: where it ends (the source line of the
  nonlinearity that closes it), its shapes, the certificate, a converged power-iteration
  estimate (CONVERGED_ITERS steps: a lower bound on the segment's norm) and their ratio (the
  certificate's slack; 1 + 1e-6 for exactly bounded segments)."""
  _require_certificate(cert)
  rows = []
  for i, seg in enumerate(cert.segments):
    conv = analysis.converged(seg, key=jax.random.fold_in(key, i), steps=CONVERGED_ITERS)
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


class Soundness(NamedTuple):
  """PGD inside one form's certified radii: a sound certificate has 0 violations."""

  violations: int  # certified points PGD broke inside their own radius
  certified_checked: int  # certified points attacked


class Report(NamedTuple):
  """`robustness_report`'s answer."""

  radii: Radii  # every test point
  pgd_robust_accuracy: np.ndarray  # (E,) on the first `attack_examples` points
  soundness: dict[str, Soundness]  # per form
  attack_examples: int

  @property
  def clean_accuracy(self) -> float:
    return float(self.radii.correct.mean())

  def to_json(self) -> dict:
    """The summary for results.json: accuracies by form and by eps (as '%g' strings)."""
    eps = [f'{e:g}' for e in self.radii.eps.tolist()]
    forms = self.radii.forms
    return {
      'clean_accuracy': self.clean_accuracy,
      'certified_accuracy': {
        f: dict(zip(eps, r.certified_accuracy.tolist(), strict=True)) for f, r in forms.items()
      },
      'median_radius': {f: r.median_radius for f, r in forms.items()},
      'pgd_robust_accuracy': dict(zip(eps, self.pgd_robust_accuracy.tolist(), strict=True)),
      'violations': {f: s.violations for f, s in self.soundness.items()},
      'certified_checked': {f: s.certified_checked for f, s in self.soundness.items()},
      'attack_examples': self.attack_examples,
    }


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
) -> Report:
  """Certified accuracy (both forms) beside PGD robust accuracy, and the soundness check.

  PGD runs on the first `attack_examples` test points: robust accuracy at each eps, and an
  attack inside each certified point's own certified radius for each form; a certified point
  broken inside its radius is a violation, and a sound certificate gives 0. Images must be
  finite pixel values in [0, 1] (PGD stays in that box).

  Returns:
    A `Report` (`.to_json()` for results.json).
  """
  box = attacks.pixel_box(pgd_kwargs.get('clip_min', 0.0), pgd_kwargs.get('clip_max', 1.0))
  checks.check_images(images, ndim=None, pixel_range=box)
  radii = certify_dataset(apply_fn, variables, cert, images, labels, eps, batch_size=batch_size)
  n = min(attack_examples, len(images))
  x, y = images[:n], labels[:n]
  fn = jax.jit(lambda z: apply_fn(variables, z))
  keys = jax.random.split(key, len(eps) + len(FORMS))
  pgd = [
    float(attacks.robust_accuracy_batched(fn, x, y, e, key=k, batch_size=batch_size, **pgd_kwargs))
    for e, k in zip(eps, keys, strict=False)
  ]
  soundness = {}
  starts = distributed.mine(len(range(0, n, batch_size)))  # this process's batches
  bar = progress.Progress(f'PGD inside the certified radii ({n} points)',
                          len(FORMS) * len(starts), unit='batches')  # fmt: skip
  for j, (f, k) in enumerate(zip(FORMS, keys[len(eps) :], strict=True)):
    r = radii.forms[f].radius[:n]
    radius = np.where(np.isfinite(r), r, 1e6)
    certified = radii.correct[:n] & (radius > 0)
    count = 0
    for b, i in enumerate(batch_size * s for s in starts):
      sl = slice(i, i + batch_size)
      count += int(
        attacks.count_violations(
          fn, x[sl], y[sl], radius[sl], certified[sl], key=jax.random.fold_in(k, i), **pgd_kwargs
        )
      )
      bar.update(j * len(starts) + b + 1)
    soundness[f] = Soundness(int(distributed.total(count)), int(certified.sum()))
  return Report(radii, np.asarray(pgd), soundness, n)
