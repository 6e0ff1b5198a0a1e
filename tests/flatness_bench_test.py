"""Tests for benchmarks/flatness_bench.py: a smoke run, a correctness check that fails, flags."""

import json

import jax
import pytest
from launcher import load_benchmark

from tsuzuku_jax import flatness


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('flatness_bench')


def test_smoke_run_writes_json(bench, tmp_path, capsys):
  out = tmp_path / 'bench.json'
  result = bench.main(['--smoke', '--models=mlp', f'--out={out}'])
  printed = capsys.readouterr().out
  for text in ('Device:', 'hvp/grad', 'vmap vs loop'):
    assert text in printed
  saved = json.loads(out.read_text())
  assert saved['ok'] and saved['device']['platform'] == jax.devices()[0].platform
  r = saved['models']['mlp']
  assert r['probes'] == 4 and r['params'] == 28 * 28 * 32 + 32 + 32 * 10 + 10
  med = {k: v['median_ms'] for k, v in r['times'].items()}
  assert r['hvp_over_grad'] == pytest.approx(med['hvp'] / med['grad'])
  assert r['vmap_speedup_over_loop'] == pytest.approx(med['loop'] / med['vmap'])
  assert len(r['times']['grad']['times_ms']) == 2
  assert result['models']['mlp']['linearized_speedup_over_loop'] > 0


def test_a_wrong_hvp_fails_the_check(bench, monkeypatch, capsys):
  real = flatness.hvp
  monkeypatch.setattr(
    flatness, 'hvp', lambda f, p, v: jax.tree.map(lambda a: 1.01 * a, real(f, p, v))
  )
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['--smoke', '--models=mlp', '--out='])
  assert exit_info.value.code == 1
  assert 'reverse-over-reverse' in capsys.readouterr().out


def test_bad_flags_are_rejected(bench):
  assert bench.parse_args(['--models=cnn,wrn']).models == ['cnn', 'wrn']
  for bad in (['--models=resnet'], ['--models='], ['--probes=0'], ['--repeats=0']):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)
