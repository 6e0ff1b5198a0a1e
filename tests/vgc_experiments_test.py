"""The VGC launcher: flag validation before any work, a tiny run, and resuming a sweep.

The tiny sweep's first run is a subprocess, as a user would run it (the shell's one-line error:
experiments_test.py), and one run is a job of 2 processes x 4 devices; the other launches run
in this process (`launcher.launch`, 8 devices)."""

import json
import os

import jax
import pytest
from launcher import assert_one_line_error, launch, run_script, tree_hashes
from multiprocess import run_launcher

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'vgc.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'vgc_digits.flags')
TINY = ['--steps=20', '--eval_every=10', '--hidden=16', '--seeds=0', '--simulate', '--workers=4']


def _run(*args, check=True):
  return launch(SCRIPT, *args, check=check)


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--alpha=-1', 'alpha'),
    ('--zeta=0', 'zeta'),
    ('--zeta=1.5', 'zeta'),
    ('--capacity=0', 'capacity'),
    ('--methods=dense,gzip', "unknown method 'gzip'"),
    ('--dataset=npz:/no/such.npz', '/no/such.npz'),
    ('--batch_size=100', 'batch_size'),
    ('--seeds=a', '--seeds'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', '--workers=8', flag, check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []


def test_workers_must_match_devices_unless_simulated(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--workers=4', '--steps=5', check=False)
  assert_one_line_error(proc, '--simulate')


def test_tiny_sweep_writes_results_and_resumes(tmp_path):
  args = [f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', *TINY, '--methods=dense,vgc,topk']
  run_script(SCRIPT, *args)  # from a shell, on one device
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['experiment'] == 'vgc'
  assert set(results['methods']) == {'dense', 'vgc', 'topk'}
  assert results['methods']['dense']['ratio_ideal'] == pytest.approx(1.0)
  assert results['methods']['dense']['speedup'] == {}
  for m in ('vgc', 'topk'):
    s = results['methods'][m]
    assert s['ratio_ideal'] > 1 and 0 < s['density_mean'] < 1
    assert len(s['density_per_step']) == 20
    rows = s['speedup']['this_model_ideal']['rows']
    assert s['speedup']['reference_model_static']['compressed_faster'] in ('below', 'always')
    assert [r['bandwidth_gbit'] for r in rows] == pytest.approx([1, 10, 100])
  assert (tmp_path / 'accuracy_vs_compression.png').stat().st_size > 0
  # An interrupted sweep (no results.json yet) resumes: finished seeds are read back.
  (tmp_path / 'results.json').unlink()
  before = (tmp_path / 'vgc' / 'seed0.json').read_text()
  proc = _run(*args)
  assert 'done before' in proc.stdout
  assert (tmp_path / 'vgc' / 'seed0.json').read_text() == before
  # Other settings in the same workdir: refused, and the finished run is left as it was.
  before = tree_hashes(tmp_path)
  proc = _run(*args, '--alpha=3', check=False)
  assert_one_line_error(proc, '--workdir', '--alpha=2.0; this one has --alpha=3.0')
  assert tree_hashes(tmp_path) == before


def test_shard_map_on_devices_and_across_processes(tmp_path):
  args = ['--steps=10', '--eval_every=5', '--hidden=16', '--methods=vgc']
  _run(f'--workdir={tmp_path / "one"}', *args)  # --workers=0: one per device
  one = json.loads((tmp_path / 'one' / 'results.json').read_text())
  assert one['workers'] == jax.device_count() == 8
  # The same 8 workers as a job of 2 processes x 4 devices: the compressed exchange crosses
  # the processes, with the same bytes (exact) and accuracy.
  run_launcher(SCRIPT, f'--workdir={tmp_path / "job"}', *args, cwd=tmp_path)
  job = json.loads((tmp_path / 'job' / 'results.json').read_text())
  assert job['workers'] == 8
  for key in ('accuracy', 'ratio_ideal', 'ratio_static', 'ratio_elements', 'density_per_step'):
    assert job['methods']['vgc'][key] == one['methods']['vgc'][key], key
  history = [json.loads((tmp_path / r / 'vgc' / 'seed0.json').read_text())['history']
             for r in ('one', 'job')]  # fmt: skip
  assert history[0]['totals'] == history[1]['totals'] and history[0]['totals']['sent'] > 0


def test_simulation_is_refused_in_a_multi_process_job(tmp_path, monkeypatch):
  # Every process would simulate every worker and write the same files: refused before any work.
  from tsuzuku_jax import checks
  from tsuzuku_jax.vgc import experiment

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(checks.InvalidInput, match='in a job of 2 processes use --nosimulate and'):
    experiment.run(experiment.Config(simulate=True, workers=8), str(tmp_path / 'sim'), cli=True)
  assert not (tmp_path / 'sim').exists()
