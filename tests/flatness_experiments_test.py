"""The flatness launcher: flag validation before any work, a tiny zoo end to end, resume."""

import json
import os

import pytest
from launcher import assert_one_line_error, run_script, tree_hashes

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'flatness.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'flatness_digits.flags')
TINY = [
  '--widths=16', '--depths=2', '--learning_rates=0.1', '--batch_sizes=64', '--weight_decays=0',
  '--label_noises=0,0.2', '--seeds=0,1', '--max_steps=300', '--check_every=100', '--probes=4',
  '--lanczos_iters=4', '--sharpness_samples=2', '--sharpness_iters=6', '--bound_hidden=16',
  '--prior_steps=50', '--posterior_steps=20', '--mc_samples=10', '--prior_sigmas=0.03',
]  # fmt: skip


def _run(*args, check=True):
  return run_script(SCRIPT, f'--flagfile={FLAGFILE}', *args, check=check)


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--widths=16,x', '--widths'),
    ('--label_noises=1.5', '--label_noises'),
    ('--learning_rates=0', '--learning_rates'),
    ('--probes=0', '--probes'),
    ('--delta=1', '--delta'),
    ('--prior_fraction=1', '--prior_fraction'),
    ('--dataset=npz:/no/such.npz', '/no/such.npz'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--workdir={tmp_path}', flag, check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []


def test_tiny_zoo_and_bound_then_resume(tmp_path):
  out = _run(f'--workdir={tmp_path}', *TINY).stdout
  assert out.count('] w16_d2') == 4
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['experiment'] == 'flatness'
  zoo = results['zoo']
  assert zoo['models'] == 4 and zoo['diverged'] == 0
  assert zoo['converged'] + len(zoo['not_converged']) == 4
  tau = zoo['tau']['normalized_trace']['all']
  assert -1 <= tau['tau'] <= 1 and set(tau['per_group']) == {'0', '1'}
  for m in ('normalized_trace', 'sigma_optimised', 'pac_bayes_mag_flatness', 'path_norm'):
    assert zoo['invariance'][m]['max_relative_change'] < 1e-4, m
  for m in ('hessian_trace', 'top_eigenvalue', 'spectral_product'):
    assert zoo['invariance'][m]['min_change_factor'] > 1.5, m
  bound = results['bound']
  assert {r['prior'] for r in bound['rows']} == {'held_out_data', 'initialisation'}
  for r in bound['rows']:
    assert r['emp_mean'] <= r['emp_upper'] <= r['bound'] <= 1
  assert bound['m'] + bound['prior_examples'] == 1347
  assert (tmp_path / 'flatness.png').stat().st_size > 0
  # An interrupted run (no results.json yet) resumes: finished models are read back, not
  # retrained or re-measured.
  (tmp_path / 'results.json').unlink()
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob('zoo/*/model.json')}
  again = _run(f'--workdir={tmp_path}', *TINY).stdout
  assert '] w16_d2' not in again and 'resuming the run' in again
  assert {p: p.stat().st_mtime_ns for p in tmp_path.glob('zoo/*/model.json')} == stamps
  assert json.loads((tmp_path / 'results.json').read_text())['zoo']['tau'] == zoo['tau']
  # Another bound model in the same workdir: one line naming the flag, nothing changed.
  before = tree_hashes(tmp_path)
  proc = _run(f'--workdir={tmp_path}', *TINY, '--bound_hidden=8', check=False)
  assert_one_line_error(proc, '--workdir', '--bound_hidden=16; this one has --bound_hidden=8')
  assert tree_hashes(tmp_path) == before
