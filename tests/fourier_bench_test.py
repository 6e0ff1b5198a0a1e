"""Tests for benchmarks/fourier_bench.py: a smoke run end to end, a check that can fail, flags."""

import json

import jax
import numpy as np
import pytest
from launcher import load_benchmark

from tsuzuku_jax import fourier


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('fourier_bench')


def test_smoke_run_writes_json(bench, tmp_path, capsys):
  out = tmp_path / 'bench.json'
  result = bench.main(['--smoke', f'--out={out}'])
  printed = capsys.readouterr().out
  for text in ('Device:', 'images/s', 'heat/limit', 'loop/heat', 'of the batched-inference limit'):
    assert text in printed
  saved = json.loads(out.read_text())
  assert saved['ok'] and saved['device']['platform'] == jax.devices()[0].platform
  assert saved['directions'] == 64 and saved['images'] == 32
  assert set(saved['heat_map']) == {'16x16', '64x32'}
  for r in saved['heat_map'].values():
    assert r['equals_loop'] and r['over_limit'] > 0 and r['loop_over_heat_map'] > 0
    assert r['fraction_of_limit'] == pytest.approx(1 / r['over_limit'])
  best = saved['inference'][str(saved['best_inference_batch'])]['images_per_s']
  assert best == max(r['images_per_s'] for r in saved['inference'].values())
  assert saved['limit_s'] == pytest.approx(64 * 32 / best)
  assert result['best_config'] in saved['heat_map']


def test_a_heat_map_that_differs_from_the_loop_fails(bench, monkeypatch, capsys):
  real = fourier.heat_map

  def off_by_one_direction(*a, **kw):
    err, loss = real(*a, **kw)
    return err.at[0, 0, 1].add(1.0 / 32), loss  # one more flip at one direction

  monkeypatch.setattr(fourier, 'heat_map', off_by_one_direction)
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['--smoke', '--out='])
  assert exit_info.value.code == 1
  printed = capsys.readouterr().out
  assert 'FAILED' in printed and 'error rates differ from the loop at 1 directions' in printed


def test_bad_flags_are_rejected(bench):
  args = bench.parse_args(['--configs=8x100,64x256', '--batch_sizes=64,128'])
  assert args.configs == [(8, 100), (64, 256)] and args.batch_sizes == [64, 128]
  for bad in (
    ['--configs=8'],
    ['--configs=0x10'],
    ['--batch_sizes=0'],
    ['--eps=0'],
    ['--hw=1'],
    ['--dataset=npz:/no/such.npz'],
  ):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)
  np.testing.assert_equal(bench.parse_args([]).configs, None)
