"""Tests for benchmarks/scaling_model.py: the expected step times follow the cost model from the
single-device times it measured (the VGC CNN) or read (lmt_bench's WRN record)."""

import json

import pytest
from launcher import load_benchmark

from tsuzuku_jax.vgc import cost_model


def test_step_times_at_8_64_256_devices(tmp_path, capsys):
  bench = load_benchmark('scaling_model')
  out = bench.main(['--smoke', f'--out={tmp_path / "s.json"}'])  # the stored CPU WRN record
  assert 'Expected step times' in capsys.readouterr().out
  assert json.loads((tmp_path / 's.json').read_text())['rows'] == out['rows']
  lmt, vgc, rows = out['lmt'], out['vgc'], out['rows']
  assert lmt['params'] == 2_748_890 and lmt['batch_size'] == 128 and lmt['step_ms'] > 0
  assert vgc['params'] == 1_070_794 and vgc['compute_ms'] > 0 and vgc['compress_ms'] > 0
  assert len(rows) == 2 * 3 * 3  # networks x devices x (LMT, VGC dense, VGC compressed)
  for r in rows:
    assert r['step_ms'] == pytest.approx(r['compute_ms'] + r['exchange_ms'])
  wrn = [r for r in rows if r['model'] == 'LMT WRN' and r['network'] == 'IB 400 Gbit/s']
  assert [r['devices'] for r in wrn] == [64, 256]
  want = cost_model.ring_allreduce_time(4 * lmt['params'], 256, 400 * cost_model.GBIT, 25e-6)
  assert wrn[1]['exchange_ms'] == pytest.approx(1e3 * want)
  assert wrn[1]['over_one_device'] == pytest.approx(wrn[1]['step_ms'] / lmt['step_ms'])
