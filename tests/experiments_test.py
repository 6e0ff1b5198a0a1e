"""The LMT launcher: flag validation before any work, and a tiny end-to-end run."""

import json
import os

import pytest
from launcher import run_script

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'lmt.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'lmt_digits.flags')
TINY = [
  '--steps=30',
  '--hidden=32',
  '--log_every=10',
  '--checkpoint_every=20',
  '--pgd_steps=5',
  '--pgd_restarts=1',
  '--attack_examples=100',
  '--eps=0.1,0.3',
]


def _run(*args, check=True):
  return run_script(SCRIPT, *args, check=check)


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--dataset=imagenet21k', '--dataset'),
    ('--dataset=npz:/no/such/file.npz', '/no/such/file.npz'),
    ('--c=0', '--c must be positive'),
    ('--c=-0.5', '--c must be positive'),
    ('--eps=0.1,abc', '--eps must be a comma-separated list of numbers'),
    ('--eps=-1', '--eps must be non-negative'),
    ('--hidden=32,x', '--hidden'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', flag, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert os.listdir(tmp_path) == []  # no work started, nothing written


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  proc = _run(f'--flagfile={FLAGFILE}', f'--workdir={blocker}/sub', check=False)
  assert proc.returncode != 0 and '--workdir' in proc.stderr and 'Traceback' not in proc.stderr
  assert blocker.read_text() == 'keep me'


def test_end_to_end_digits_then_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  # Flags after --flagfile override the file.
  out = _run(f'--flagfile={FLAGFILE}', f'--workdir={workdir}', *TINY).stdout
  assert 'step 30/30' in out
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['flags']['steps'] == 30 and results['flags']['hidden'] == ['32']
  for name in ('lmt', 'baseline'):
    r = results[name]
    assert set(r['certified_accuracy']) == {'global', 'pairwise'}
    assert set(r['certified_accuracy']['pairwise']) == {'0.1', '0.3'}
    # Pairwise bounds are never looser than the global sqrt(2) L form.
    for e in ('0.1', '0.3'):
      assert r['certified_accuracy']['pairwise'][e] >= r['certified_accuracy']['global'][e]
    assert r['violations'] == {'global': 0, 'pairwise': 0}
    assert r['certified_checked']['pairwise'] > 0
    for layer in r['layers'].values():
      assert layer['certificate'] >= layer['converged'] * (1 - 1e-6)
  assert os.path.getsize(os.path.join(workdir, 'certified_accuracy.png')) > 1000
  # Same command again: both runs resume from their final checkpoints and redo the evaluation.
  again = _run(f'--flagfile={FLAGFILE}', f'--workdir={workdir}', *TINY).stdout
  assert again.count('resumed from') == 2 and 'step 30/30' not in again
  assert json.load(open(os.path.join(workdir, 'results.json')))['lmt'] == results['lmt'] | {
    'train_seconds': json.load(open(os.path.join(workdir, 'results.json')))['lmt']['train_seconds']
  }


def test_diverging_run_stops_with_one_line(tmp_path):
  proc = _run(
    f'--flagfile={FLAGFILE}',
    f'--workdir={tmp_path}',
    *TINY,
    '--learning_rate=1e30',
    '--nobaseline',
    check=False,
  )
  assert proc.returncode != 0
  assert 'diverged' in proc.stderr and 'last good checkpoint' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'results.json')
