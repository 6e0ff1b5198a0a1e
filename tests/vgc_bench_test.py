"""Tests for benchmarks/vgc_bench.py: a smoke run end to end, checks that can fail, bad flags."""

import dataclasses
import json
import os

import jax
import pytest
from launcher import load_benchmark

from tsuzuku_jax.vgc import compression

_PATH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'vgc_bench.py')
# One size, one compared method and one model keep the smoke run to a few compilations.
_SMOKE = ['--smoke', '--sizes=4096', '--methods=vgc,topk', '--models=mlp']


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('vgc_bench')


def test_smoke_run_writes_json(bench, tmp_path, capsys):
  out = tmp_path / 'bench.json'
  result = bench.main([*_SMOKE, f'--out={out}'])
  printed = capsys.readouterr().out
  for text in ('Device:', 'ms/floor', '(b-a)/(a-f)', 'B* Gbit/s', 'ASSUMED'):
    assert text in printed
  saved = json.loads(out.read_text())
  assert saved['ok'] and saved['device']['platform'] == jax.devices()[0].platform
  for key in ('settings', 'correctness', 'bandwidth', 'compress', 'variance', 'cost_model'):
    assert key in saved
  assert saved['correctness']['ok'] and saved['bandwidth']['bytes_per_s'] > 0
  per = saved['compress']['4096']
  assert set(per) == {'vgc', 'topk'}
  for r in per.values():
    assert r['ratio_to_floor'] > 0 and r['achieved_gb_s'] > 0
    assert len(r['times_ms']) == saved['settings']['repeats']
  assert per['vgc']['last_stats']['sent'] > 0
  mlp = saved['variance']['mlp']
  assert mlp['correctness']['ok'] and mlp['fwd_bwd']['median_ms'] > 0
  assert mlp['cheap_extra_over_step'] == pytest.approx(
    (mlp['cheap']['median_ms'] - mlp['fwd_bwd']['median_ms']) / mlp['fwd_bwd']['median_ms']
  )
  rows = saved['cost_model']['rows']
  assert [r['t_compute_assumed'] for r in rows] == [False, True]
  assert rows[1]['params'] == 25_000_000
  assert rows[1]['byte_ratio'] == pytest.approx(100, rel=1e-4)  # 4 B/elem at density 0.01
  assert all(row['speedup'] > 0 for r in rows for row in r['rows'])
  assert result['cost_model']['rows'][0]['inputs']['t_compute'] > 0


def test_conservation_check_fails_on_a_leaky_compressor(bench, monkeypatch, capsys):
  args = bench.parse_args(['--smoke', '--methods=vgc'])  # passes: see the smoke test
  real_make = compression.make

  def leaky_make(*a, **kw):
    comp = real_make(*a, **kw)

    def update(grads, state, variance=None):
      msgs, new, stats = comp.update(grads, state, variance)
      # Loses 1 % of the residual: no longer sent + r_new == r + g.
      return msgs, new._replace(residual=jax.tree.map(lambda r: 0.99 * r, new.residual)), stats

    return dataclasses.replace(comp, update=update)

  monkeypatch.setattr(compression, 'make', leaky_make)
  record, ok = bench.check_conservation(args)
  assert not ok and any('decoded + residual' in f for f in record['failures'])
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['--smoke', '--methods=vgc', '--models=mlp'])
  assert exit_info.value.code == 1
  assert 'FAILED' in capsys.readouterr().out


def test_bad_flags_are_rejected(bench):
  assert bench.parse_args(['--sizes=1M,4K']).sizes == [4096, 2**20]
  for bad in (
    ['--sizes=0'],
    ['--sizes=512M'],
    ['--methods=topk'],
    ['--methods=vgc,qsgd'],
    ['--models=resnet'],
    ['--batch_size=10'],
    ['--density=0'],
    ['--capacity=2'],
    ['--repeats=0'],
  ):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)
