"""Tests for benchmarks/accelerator_suite.py: a smoke run through the suite (the CPU path of
the one command the GPU session runs), every figure read from the stored full-size records, the
accelerator settings' flags, and the suite's handling of a failure, a missing figure, a time
budget and a precision retry."""

import importlib.util
import json
import time
import types

import jax
import pytest
from launcher import load_benchmark


@pytest.fixture(scope='module')
def suite():
  return load_benchmark('accelerator_suite')


def _expected_figures(suite, names=None) -> list[str]:
  return [fig for name in names or suite.ORDER for fig, _, _ in suite.FIGURES[name]]


def test_the_figures_of_the_stored_cpu_records(suite):
  # The full-size records (benchmarks/results/*_cpu.json) hold every figure the suite reads.
  import os

  results = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'results')
  stored = {'lmt': 'lmt_bench_cpu', 'lmt_wrn': 'lmt_bench_cpu', 'vgc': 'vgc_bench_cpu',
            'fourier': 'fourier_bench_cpu', 'scaling': 'scaling_model_cpu'}  # fmt: skip
  for name, file in stored.items():
    with open(os.path.join(results, f'{file}.json')) as f:
      record = json.load(f)
    for fig, get, _ in suite.FIGURES[name]:
      assert float(get(record)) > 0, fig


# The suite's own path (load, argv, $OUT, the table) through its cheapest bench; every bench's
# smoke run has its own test, and the figures are read below from the full-size CPU records.
SMOKED = ('fourier',)


def test_smoke_runs_every_benchmark_into_out(suite, tmp_path, monkeypatch, capsys):
  out = tmp_path / 'device_out'
  monkeypatch.setenv('OUT', str(out))  # as on the device: $OUT wins over --out_dir
  result = suite.main(
    ['--smoke', '--out_dir', str(tmp_path / 'unused'), '--benches', ','.join(SMOKED)]
  )
  printed = capsys.readouterr().out
  assert result['ok'] and not (tmp_path / 'unused').exists()
  saved = json.loads((out / 'suite.json').read_text())
  assert saved['device']['platform'] == jax.devices()[0].platform
  assert list(saved['benches']) == list(SMOKED)
  for name, status in saved['benches'].items():
    assert status['status'] == 'ok', (name, status)
    bench = json.loads((out / status['json']).read_text())
    assert bench['ok'] and bench['settings']['smoke'], name
  assert len({s['json'] for s in saved['benches'].values()}) == len(SMOKED)
  assert [r['figure'] for r in saved['rows']] == _expected_figures(suite, SMOKED)
  has_torch = importlib.util.find_spec('torch') is not None
  for row in saved['rows']:
    if 'torch' in row['figure'] and not has_torch:
      assert row['value'] == 'n/a' and 'torch' in row['reason'], row
    else:
      assert isinstance(row['value'], float) and 'reason' not in row and 'note' not in row, row
    assert row['figure'] in printed
  assert 'ratio of' in printed and 'suite.json' in printed


def test_accelerator_settings_parse_and_the_heat_map_uses_the_loops_images(suite):
  for module, argv in suite.plan(smoke=False).values():
    load_benchmark(module).parse_args(argv)  # a bad flag would cost a device run
  _, argv = suite.plan(smoke=False)['fourier']
  fourier = load_benchmark('fourier_bench')
  s = fourier._settings(fourier.parse_args(argv), on_gpu=True)
  assert s.images == 10_000
  # The bench compares the heat map with its loop only when they cover the same images.
  for best in s.batch_sizes:
    loop_images = s.images // best * best
    assert any(s.images // min(b, s.images) * min(b, s.images) == loop_images for _, b in s.configs)


def _lmt(models):
  cert = {'certify': {'images_per_s': 50.0}, 'plain': {'images_per_s': 100.0}}
  return {
    m: {'train_step': {'lmt': {'ratio_to_plain_paired_median': 1.1}}, 'certification': cert}
    for m in models
  }


def _fake_benches(calls):
  """Stand-ins (no compilation): vgc raises, flatness raises with the PyTorch peer and lacks a
  key without it, fourier fails its check at the default precision only."""

  def lmt(argv):
    calls.append(argv)
    return {'models': _lmt(['wrn'] if '--models=wrn' in argv else ['mlp', 'cnn'])}

  def vgc(argv):
    raise RuntimeError('device ran out of memory\nsecond line')

  def flatness(argv):
    if '--torch=auto' in argv:
      raise RuntimeError('CUDA error: out of memory')
    return {'models': {'mlp': {'hvp_over_grad': 1.5}, 'cnn': {}}}

  def fourier(argv):
    if jax.config.jax_default_matmul_precision != 'highest':
      print('\nHeat map equals loop check FAILED; no timings are reported.')
      print('  8x1000: error rates differ from the loop at 2 directions')
      raise SystemExit(1)
    return {'best_config': '8x1000', 'heat_map': {'8x1000': {'over_limit': 1.2}}}

  def scaling(argv):
    row = {'network': 'IB 400 Gbit/s', 'devices': 256, 'over_one_device': 1.3}
    rows = [{**row, 'model': m, 'method': k} for m, k in (('LMT WRN', 'dense'), ('VGC CNN', 'vgc'))]
    return {'rows': rows}

  mains = {'lmt_bench': lmt, 'vgc_bench': vgc, 'flatness_bench': flatness}
  mains.update(fourier_bench=fourier, scaling_model=scaling)
  return lambda module: types.SimpleNamespace(main=mains[module])


def test_failures_missing_figures_budget_and_retry(suite, tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.delenv('OUT', raising=False)
  monkeypatch.setattr(suite, 'load', _fake_benches(calls))
  monkeypatch.setattr(suite, 'platform', lambda: 'gpu')
  monkeypatch.setattr(suite, 'expected_s', lambda name, smoke: 1e6 if name == 'lmt_wrn' else 1)
  t0 = time.perf_counter()
  result = suite.main(['--out_dir', str(tmp_path), '--budget_s', '100'])
  assert time.perf_counter() - t0 < 10
  assert not result['ok']  # vgc failed: the exit status is 1
  assert len(calls) == 1  # lmt ran; lmt_wrn was skipped before it started
  b = result['benches']
  assert b['lmt']['status'] == 'ok' and b['flatness']['status'] == 'ok'
  assert b['vgc'] == {
    **b['vgc'],
    'status': 'failed',
    'error': 'RuntimeError: device ran out of memory',
  }
  assert b['lmt_wrn'] == {**b['lmt_wrn'], 'status': 'skipped', 'reason': 'time budget'}
  assert b['fourier']['status'] == 'ok' and b['fourier']['precision'].startswith('highest')
  assert b['fourier']['default_precision_error'] == (
    'Heat map equals loop check FAILED; no timings are reported. | '
    '8x1000: error rates differ from the loop at 2 directions'
  )
  rows = {r['figure']: r for r in result['rows']}
  assert list(rows) == _expected_figures(suite)
  assert rows['lmt mlp: certify/infer rate']['value'] == 0.5
  assert rows['vgc: compress/floor']['reason'] == 'RuntimeError: device ran out of memory'
  assert rows['flatness mlp: hvp/grad']['value'] == 1.5
  assert b['flatness']['argv'][-2:] == ['--torch=no', f'--out={tmp_path / "flatness_bench.json"}']
  dropped = 'PyTorch peer dropped after: RuntimeError: CUDA error: out of memory'
  for m in ('mlp', 'cnn'):
    assert rows[f'flatness {m}: torch/ours hvp']['reason'] == dropped
  assert rows['flatness cnn: hvp/grad']['reason'] == 'no models.cnn.hvp_over_grad in its JSON'
  assert rows['fourier: heat map/limit'] == {**rows['fourier: heat map/limit'], 'value': 1.2}
  assert rows['fourier: heat map/limit']['note'] == 'at highest matmul precision'
  assert (
    rows['fourier: loop/heat map']['reason'] == 'no heat_map.8x1000.loop_over_heat_map in its JSON'
  )
  assert rows['lmt wrn: LMT/plain step'] == {**rows['lmt wrn: LMT/plain step'], 'value': 'n/a'}
  assert rows['scaling: LMT WRN dense at 256 devices']['value'] == 1.3
  assert rows['scaling: VGC CNN dense at 256 devices']['reason'] == (
    'no VGC CNN dense row at 256 devices in its JSON'
  )
  assert json.loads((tmp_path / 'suite.json').read_text())['rows'] == result['rows']
  assert jax.config.jax_default_matmul_precision is None  # the retry's precision is undone
  with pytest.raises(SystemExit):
    suite.parse_args(['--benches=lmt,resnet'])
