"""The flatness experiment: flag validation before any work (the launcher) and the Config's own
checks, a tiny zoo end to end from flags, resume, and the same run from Python.

The tiny zoo's first run is a job of 2 processes x 4 devices, as on a pod (each trains half of
the zoo), resumed by a launch in this process (`launcher.launch`, as the other launches)."""

import dataclasses
import json
import os
import re
import shutil

import pytest
from launcher import assert_one_line_error, launch, tree_hashes
from multiprocess import run_launcher

from tsuzuku_jax.flatness import experiment, pac_bayes

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'flatness.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'flatness_digits.flags')
TINY = [
  '--widths=16', '--depths=2', '--learning_rates=0.1', '--batch_sizes=64', '--weight_decays=0',
  '--label_noises=0,0.2', '--seeds=0,1', '--max_steps=300', '--check_every=100', '--probes=4',
  '--lanczos_iters=4', '--sharpness_samples=2', '--sharpness_iters=6', '--bound_hidden=16',
  '--prior_steps=50', '--posterior_steps=20', '--mc_rounds=2', '--prior_sigmas=0.03',
]  # fmt: skip


def _run(*args, check=True):
  return launch(SCRIPT, f'--flagfile={FLAGFILE}', *args, check=check)


# One launch per kind of failure (absl's parse errors, the launcher's list parsing, the Config's
# own checks, the dataset): each must be one line before any work. The Config's other checks
# are tested on the Config below.
@pytest.mark.parametrize(
  'flag, message',
  [
    ('--widths=16,x', "--widths must be a comma-separated list of integers, got ['16', 'x']"),
    ('--label_noises=1.5', '--label_noises must be fractions in [0, 1], got (1.5,)'),
    ('--probes=abc', "flag --probes=abc: invalid literal for int() with base 10: 'abc'"),
    ('--dataset=npz:/no/such.npz', '/no/such.npz'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--workdir={tmp_path}', flag, check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(widths=(16, 0)), 'widths must be positive integers, got (16, 0)'),
    (dict(depths=()), 'depths must be positive integers'),
    (dict(learning_rates=(0.0,)), 'learning_rates must be positive numbers'),
    (dict(batch_sizes=(0,)), 'batch_sizes must be positive integers'),
    (dict(weight_decays=(-1e-4,)), 'weight_decays must be numbers >= 0'),
    (dict(label_noises=(0.0, 1.5)), 'label_noises must be fractions in [0, 1]'),
    (dict(seeds=(-1,)), 'seeds must be integers >= 0'),
    (dict(bound_hidden=(0,)), 'bound_hidden must be positive integers'),
    (dict(prior_sigmas=()), 'prior_sigmas must be positive numbers'),
    (dict(probes=0), 'probes must be >= 1, got 0'),
    (dict(max_steps=0), 'max_steps must be >= 1'),
    (dict(mc_rounds=0), 'mc_rounds must be >= 1'),
    (dict(prior_fraction=1.0), 'prior_fraction must be in (0, 1), got 1.0'),
    (dict(delta=1.0), 'delta (a confidence) must be in (0, 1), got 1.0'),
    (dict(delta_mc=0.0), 'delta_mc (a confidence) must be in (0, 1)'),
    (dict(rescale=0.5), 'rescale must be >= 1, got 0.5'),
  ],
)
def test_config_names_the_bad_field(fields, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    experiment.Config(**fields)


def test_launcher_defaults_are_the_config_defaults():
  # The flags are defined from the Config: the flag file's values give the Config defaults.
  config = experiment.Config()
  assert config.widths == (64, 256) and config.weight_decays == (0.0, 1e-4)
  assert config.prior_sigmas == (0.01, 0.03, 0.1) and config.bound_hidden == (256,)


def test_config_from_notebook_runs_the_same_experiment(tmp_path):
  # The launcher is flags -> Config -> run: the same run from Python, resumable, refusing others.
  # TINY's settings but one seed (the programs are those of the launch below: compiled once).
  config = experiment.Config(
    widths=(16,), depths=(2,), learning_rates=(0.1,), batch_sizes=(64,), weight_decays=(0.0,),
    label_noises=(0.0, 0.2), seeds=(0,), max_steps=300, check_every=100, probes=4,
    lanczos_iters=4, sharpness_samples=2, sharpness_iters=6, bound_hidden=(16,), prior_steps=50,
    posterior_steps=20, mc_rounds=2, prior_sigmas=(0.03,),
  )  # fmt: skip
  lines = []
  results = experiment.run(config, str(tmp_path), log=lines.append)
  assert results['config']['widths'] == (16,) and results['zoo']['models'] == 2
  assert sum('/2 w16_d2' in line for line in lines) == 2 and len(results['bound']['rows']) == 2
  assert json.loads((tmp_path / 'results.json').read_text())['config']['widths'] == [16]
  assert (tmp_path / 'flatness.png').exists() and len(list(tmp_path.glob('zoo/*/model.json'))) == 2
  assert experiment.run(config, str(tmp_path), log=lines.append) is None  # complete: nothing
  with pytest.raises(ValueError, match='seeds=0; this one has seeds=0,1'):
    experiment.run(dataclasses.replace(config, seeds=(0, 1)), str(tmp_path), log=lines.append)
  # The bound alone, the posterior being the prior (KL 0 but for sigma's float32 rounding), one
  # prior: the certificate is Langford-Seeger at the sampled error's upper bound, whole delta.
  alone = dataclasses.replace(config, zoo=False, posterior_steps=0, init_prior=False)
  bound = experiment.run(alone, str(tmp_path / 'alone'), log=lines.append)['bound']
  (row,) = bound['rows']
  assert 0 <= row['kl'] < 1e-9 and row['objective'] is None and row['samples'] == 2 * bound['m']
  want = pac_bayes.langford_seeger(row['emp_upper'], row['kl'], bound['m'], config.delta)
  assert row['bound'] == want and row['emp_mean'] <= row['emp_upper'] <= row['bound']


def test_tiny_zoo_and_bound_then_resume(tmp_path):
  # A job of 2 processes x 4 devices: each trains and measures half of the zoo.
  procs = run_launcher(SCRIPT, f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', *TINY,
                       cwd=tmp_path)  # fmt: skip
  out = procs[0].stdout
  assert out.count('/2 w16_d2') == 2 and procs[1].stdout.count('/2 w16_d2') == 0  # process 0's
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['experiment'] == 'flatness'
  assert results['config']['widths'] == [16] and results['config']['label_noises'] == [0, 0.2]
  assert results['config']['max_steps'] == 300 and 'flags' not in results
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
  assert [r['prior'] for r in bound['rows']] == ['held_out_data']  # the flag file's --noinit_prior
  for r in bound['rows']:
    assert r['emp_mean'] <= r['emp_upper'] <= r['bound'] <= 1
  assert bound['m'] + bound['prior_examples'] == 1347
  assert (tmp_path / 'flatness.png').stat().st_size > 0
  # An interrupted run (no results.json yet) resumes in one process: finished models are read
  # back, not retrained or re-measured; one that process 1 had trained is retrained here, to
  # the same record (to float32 rounding).
  (tmp_path / 'results.json').unlink()
  lost = tmp_path / 'zoo' / 'w16_d2_lr0.1_b64_wd0_n0.2_s0'
  by_job = json.loads((lost / 'model.json').read_text())
  shutil.rmtree(lost)
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob('zoo/*/model.json')}
  again = _run(f'--workdir={tmp_path}', *TINY).stdout
  assert again.count('/4 w16_d2') == 1 and 'resuming the run' in again
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  here = json.loads((lost / 'model.json').read_text())
  assert (here['steps'], here['test_acc']) == (by_job['steps'], by_job['test_acc'])
  for key in ('measures', 'rescaled'):  # float32 rounding: another process's thread pool
    assert here[key] == pytest.approx(by_job[key], rel=1e-5), key
  resumed = json.loads((tmp_path / 'results.json').read_text())
  assert resumed['zoo']['tau'] == zoo['tau']
  # The prior is the job's (its checkpoint): the same certificates, computed in one process.
  for a, b in zip(resumed['bound']['rows'], bound['rows'], strict=True):
    assert a['bound'] == pytest.approx(b['bound'], rel=1e-6) and a['kl'] == pytest.approx(b['kl'])
  # Another bound model in the same workdir: one line naming the flag, nothing changed.
  before = tree_hashes(tmp_path)
  proc = _run(f'--workdir={tmp_path}', *TINY, '--bound_hidden=8', check=False)
  assert_one_line_error(proc, '--workdir', '--bound_hidden=16; this one has --bound_hidden=8')
  assert tree_hashes(tmp_path) == before
