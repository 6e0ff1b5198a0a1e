"""Rank correlation of a complexity measure with the generalization gap over a model zoo:
Kendall's tau and Jiang et al.'s (ICLR 2020) granulated tau.

Models are rows of a table: a dict of hyperparameter values per model, a measure value and a
gap. The granulated tau of hyperparameter k is the mean, over every setting of the *other*
hyperparameters, of Kendall's tau among the models that differ only in k (groups with fewer
than two models or no variation are skipped); Psi is the mean over k. It asks whether the
measure tracks the gap when one thing changes at a time, which the overall tau, dominated by
the hyperparameters that move the gap most, does not.
"""

import itertools
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's tau-b (ties in x or y handled as in scipy.stats.kendalltau); nan if either
  side is constant or there are fewer than two points."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'x and y must be 1-D of equal length, got {x.shape} and {y.shape}')
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError('x and y must be finite')
  if x.size < 2:
    return float('nan')
  i, j = np.triu_indices(x.size, 1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  n_x, n_y = np.sum(dx != 0), np.sum(dy != 0)
  if n_x == 0 or n_y == 0:
    return float('nan')
  return float(np.sum(dx * dy) / np.sqrt(n_x * n_y))


def granulated_tau(
  hparams: Sequence[dict], measure: Sequence[float], gap: Sequence[float]
) -> dict[str, float]:
  """{hyperparameter: granulated tau, ..., 'psi': their mean} (see the module docstring).

  Args:
    hparams: one dict per model, all with the same keys.
    measure, gap: one value per model.
  """
  if not hparams:
    raise ValueError('no models')
  keys = sorted(hparams[0])
  if any(sorted(h) != keys for h in hparams):
    raise ValueError('every model needs the same hyperparameter keys')
  if not len(hparams) == len(measure) == len(gap):
    raise ValueError(
      f'{len(hparams)} hyperparameter rows, {len(measure)} measures and {len(gap)} gaps'
    )
  out = {}
  for k in keys:
    groups = defaultdict(list)
    for idx, h in enumerate(hparams):
      groups[tuple(h[o] for o in keys if o != k)].append(idx)
    taus = []
    for members in groups.values():
      t = kendall_tau([measure[i] for i in members], [gap[i] for i in members])
      if not np.isnan(t):
        taus.append(t)
    out[k] = float(np.mean(taus)) if taus else float('nan')
  vals = [v for v in out.values() if not np.isnan(v)]
  out['psi'] = float(np.mean(vals)) if vals else float('nan')
  return out


def grid(**axes) -> list[dict]:
  """Every combination of the given hyperparameter values, as dicts (row-major)."""
  names = list(axes)
  return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


def summary(
  rows: Sequence[dict], measure: str, hparam_keys: Sequence[str], group: str = 'seed'
) -> dict:
  """Kendall's tau and granulated tau of `row[measure]` against `row['gap']` over `rows`,
  pooled and per value of `row[group]` (e.g. one zoo per seed), with the mean and standard
  deviation over the groups: the spread of a correlation over independent zoos."""
  if not rows:
    raise ValueError('no models')
  x = [r[measure] for r in rows]
  y = [r['gap'] for r in rows]
  hp = [{k: r[k] for k in hparam_keys} for r in rows]
  out = {'n': len(rows), 'tau': kendall_tau(x, y), 'granulated': granulated_tau(hp, x, y)}
  per = {}
  for g in sorted({r[group] for r in rows}):
    sub = [r for r in rows if r[group] == g]
    per[str(g)] = {
      'n': len(sub),
      'tau': kendall_tau([r[measure] for r in sub], [r['gap'] for r in sub]),
      'psi': granulated_tau(
        [{k: r[k] for k in hparam_keys} for r in sub],
        [r[measure] for r in sub],
        [r['gap'] for r in sub],
      )['psi'],
    }
  out['per_group'] = per
  for k in ('tau', 'psi'):
    vals = [v[k] for v in per.values() if not np.isnan(v[k])]
    out[f'{k}_mean'] = float(np.mean(vals)) if vals else float('nan')
    out[f'{k}_std'] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float('nan')
  return out
