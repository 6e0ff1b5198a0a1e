"""Tests for benchmarks/lmt_bench.py: a smoke run end to end, and a check that can fail."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from launcher import load_benchmark

from tsuzuku_jax import lmt, models


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('lmt_bench')


def test_smoke_run_writes_json(bench, tmp_path, capsys):
  out = tmp_path / 'bench.json'
  result = bench.main(['--smoke', '--models=mlp', f'--out={out}'])
  printed = capsys.readouterr().out
  assert 'LMT/plain' in printed and 'certify img/s' in printed and 'Device:' in printed
  saved = json.loads(out.read_text())
  assert saved['ok'] and saved['device']['platform'] == jax.devices()[0].platform
  record = saved['models']['mlp']
  assert record['correctness']['ok']
  assert record['correctness']['min_segment_ratio'] >= 1 - bench.FAIL_RTOL
  for variant in ('lmt', 'gloro'):
    assert record['train_step'][variant]['ratio_to_plain'] > 0
    assert len(record['train_step'][variant]['times_ms']) == record['repeats']
  assert record['certification']['certify']['images_per_s'] > 0
  assert result['models']['mlp']['certification']['certify_over_plain_time'] > 0


def test_check_fails_when_certificate_is_below_converged(bench, monkeypatch):
  model = models.MLP(hidden=(16,))
  shape = (4, 4, 1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  cert = lmt.certificate(model.apply, variables, shape)
  iterates = lmt.init_iterates(model.apply, variables, shape, key=jax.random.key(1))
  record, ok = bench.check_bounds(model.apply, variables, shape, cert, iterates)
  assert ok and not record['failures']

  real_report = lmt.segment_report

  def shrunk_report(*args, **kwargs):
    out = real_report(*args, **kwargs)
    out[0]['certificate'] = 0.9 * out[0]['converged']
    return out

  monkeypatch.setattr(lmt, 'segment_report', shrunk_report)
  record, ok = bench.check_bounds(model.apply, variables, shape, cert, iterates)
  assert not ok
  assert any('segment 0' in f for f in record['failures'])
  # The network's pairwise bounds are checked too.
  monkeypatch.setattr(lmt, 'segment_report', real_report)
  small = dataclasses.replace(cert, pairwise=cert.pairwise / 2)
  record, ok = bench.check_bounds(model.apply, variables, shape, small, iterates)
  assert not ok and any('pairwise' in f for f in record['failures'])


def test_bad_flags_are_rejected(bench):
  with pytest.raises(SystemExit):
    bench.parse_args(['--models=mlp,resnet'])
  with pytest.raises(SystemExit):
    bench.parse_args(['--c=0'])


def test_tightness_smoke_run_certificates_above_the_jacobians_found(tmp_path, capsys):
  bench = load_benchmark('lmt_tightness')
  out = tmp_path / 'tightness.json'
  bench.main(['--smoke', f'--out={out}'])
  assert 'seg/found' in capsys.readouterr().out
  saved = json.loads(out.read_text())
  for r in saved['models'].values():
    assert r['segments_over_found'] >= 1 - 1e-5 and r['product'] >= r['segments'] * (1 - 1e-6)
