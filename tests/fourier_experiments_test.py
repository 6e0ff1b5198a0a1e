"""The Fourier launcher: flag validation before any work, and a tiny end-to-end run."""

import json
import os

import pytest
from launcher import assert_one_line_error, run_script, tree_hashes

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'fourier.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'fourier_digits.flags')
TINY = ['--steps=30', '--channels=4,8', '--dense=16', '--random_trials=2', '--uap_steps=5']


def _run(*args, check=True):
  return run_script(SCRIPT, *args, check=check)


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--eps=-1', '--eps'),
    ('--eps=a', '--eps'),
    ('--dataset=npz:/no/such.npz', '/no/such.npz'),
    ('--channels=4,x', '--channels'),
    ('--linf_equivalent=4/0', '--linf_equivalent'),
    ('--random_target=1', '--random_target'),
    ('--shift_stride=0', '--shift_stride'),
    ('--heldout_images=-1', '--heldout_images'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', flag, check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []


def test_tiny_run(tmp_path):
  _run(
    f'--flagfile={FLAGFILE}',
    f'--workdir={tmp_path}',
    *TINY,
    '--search=halving',
    '--eps=auto,1.4',
    '--linf_equivalent=1/8',
    '--shift_stride=3',
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['experiment'] == 'fourier'
  auto, given, linf = results['per_eps'].values()
  assert auto['eps_choice'].startswith('auto') and auto['random_heldout_fooling_mean'] <= 0.05
  assert given['eps'] == 1.4 and linf['eps'] == pytest.approx(0.125 * 32**0.5)
  for row in (auto, given, linf):
    assert 0 <= row['fourier_heldout_fooling'] <= 1 and row['queries'] > 0
  assert results['heat_map_images'] == 450 and results['heldout_images'] == 194
  assert len(results['heat_map_error']) == 8
  assert (tmp_path / 'fourier.png').stat().st_size > 0
  # The same workdir with another model: one line naming it, nothing written is lost.
  before = tree_hashes(tmp_path)
  proc = _run(
    f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', *TINY, '--channels=2,4', check=False
  )
  assert_one_line_error(proc, '--workdir', '--channels=4,8; this one has --channels=2,4')
  assert tree_hashes(tmp_path) == before
  assert os.listdir(tmp_path / 'model' / 'checkpoints') == ['30']
