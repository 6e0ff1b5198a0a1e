"""Kill-and-restart at random moments (3 kills, tiny settings) ends exactly as an uninterrupted
run; bad inputs against the finished run get one line and change no file. The 20-kill version
on a longer run is `benchmarks/reliability.py`."""

import os

import pytest
from launcher import load_benchmark

FLAGS = [
  '--steps=200',
  '--hidden=64',
  '--log_every=25',
  '--checkpoint_every=50',
  '--c_warmup_steps=50',
  '--pgd_steps=5',
  '--pgd_restarts=1',
  '--attack_examples=50',
  '--eps=0.1,0.3',
]


@pytest.fixture(scope='module')
def bench():
  return load_benchmark('reliability')


def test_kill_restart_then_bad_inputs(bench, tmp_path):
  flags = [bench.FLAGS[0], *FLAGS]  # the digits flagfile, then tiny settings
  out = bench.kill_restart(flags, str(tmp_path), kills=3, seed=1)
  checks = out['checks']
  assert checks['all_kills_landed'] and checks['kills_landed'] == 3, out['events']
  assert checks['params_bit_identical'] and checks['results_identical'], checks
  assert checks['metrics_steps_exact'] and checks['no_results_json_after_a_kill'], checks
  rows = bench.bad_inputs(str(tmp_path / 'reference'), str(tmp_path / 'scratch'), flags, only=2)
  assert [r['via'] for r in rows] == ['launcher'] * 2 + ['library'] * 2
  for row in rows:
    assert bench.row_ok(row), row
  table = bench.markdown(rows, str(tmp_path))
  assert table.count('\n') == 5 and 'RUNS/' not in table.split('\n')[2]
  assert os.path.exists(tmp_path / 'killed' / 'results.json')
