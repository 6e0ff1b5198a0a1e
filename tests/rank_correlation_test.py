"""Kendall and granulated tau against scipy and hand-computed cases."""

import numpy as np
import pytest
from scipy import stats

from tsuzuku_jax.flatness import rank_correlation as rc


def test_kendall_tau_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(5):
    x = rng.integers(0, 5, 30).astype(float)
    y = x + rng.integers(0, 3, 30)
    assert rc.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, rel=1e-12)
  assert rc.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
  assert np.isnan(rc.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_granulated_tau_isolates_each_hyperparameter():
  hp = rc.grid(width=[1, 2, 3], lr=[0.1, 0.2])
  assert len(hp) == 6 and hp[0] == {'width': 1, 'lr': 0.1}
  # The gap grows with width and shrinks with lr; the measure tracks width only.
  gap = [h['width'] - 10 * h['lr'] for h in hp]
  measure = [h['width'] for h in hp]
  g = rc.granulated_tau(hp, measure, gap)
  assert g['width'] == 1.0
  assert np.isnan(g['lr'])  # the measure is constant when only lr varies: skipped
  assert g['psi'] == 1.0
  anti = rc.granulated_tau(hp, [-h['lr'] for h in hp], gap)
  assert anti['lr'] == 1.0 and np.isnan(anti['width'])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='equal length'):
    rc.kendall_tau([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match='finite'):
    rc.kendall_tau([1, np.nan], [1, 2])
  with pytest.raises(ValueError, match='same hyperparameter keys'):
    rc.granulated_tau([{'a': 1}, {'b': 1}], [1, 2], [1, 2])
  with pytest.raises(ValueError, match='measures'):
    rc.granulated_tau([{'a': 1}], [1, 2], [1])


def test_summary_pools_and_splits_by_seed():
  rows = [
    {'a': a, 'seed': s, 'gap': g, 'm': v}
    for s, (gs, vs) in enumerate([([0.1, 0.2, 0.3], [1, 2, 3]), ([0.1, 0.2, 0.3], [3, 1, 2])])
    for a, g, v in zip([1, 2, 3], gs, vs, strict=True)
  ]
  out = rc.summary(rows, 'm', ['a'])
  assert out['n'] == 6 and out['per_group']['0']['tau'] == pytest.approx(1.0)
  assert out['per_group']['1']['tau'] == pytest.approx(-1 / 3)
  assert out['tau_mean'] == pytest.approx(1 / 3)
  assert out['tau_std'] == pytest.approx(np.std([1.0, -1 / 3], ddof=1))
  assert out['tau'] == pytest.approx(
    rc.kendall_tau([r['m'] for r in rows], [r['gap'] for r in rows])
  )
