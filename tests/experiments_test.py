"""The LMT launcher: flag validation before any work, a tiny end-to-end run, and the workdir as
a record (refusing other runs with one line, nothing on disk touched; --overwrite; resume).

The end-to-end run is a job of 2 processes x 4 CPU devices, as on a pod, checked against the
same run from Python in this process (8 devices); --helpshort and one bad flag run the launcher
in a subprocess; the other launches run it in this process (`launcher.launch`: the same
parsing, checks and one-line errors, without seconds of imports each)."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from launcher import assert_one_line_error, launch, once_per_session, run_script, tree_hashes
from multiprocess import run_launcher

from tsuzuku_jax.lmt import experiment

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'lmt.py')
FOURIER = os.path.join(ROOT, 'experiments', 'fourier.py')
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
  return launch(SCRIPT, f'--flagfile={FLAGFILE}', *args, check=check)


def _job(folder):
  workdir = folder / 'run'
  os.makedirs(folder)
  procs = run_launcher(SCRIPT, f'--flagfile={FLAGFILE}', f'--workdir={workdir}', *TINY, cwd=folder)
  assert 'step ' not in procs[1].stdout  # process 0 alone prints the progress
  return procs[0].stdout


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished tiny LMT run (both models) by a job of 2 processes x 4 devices, and process 0's
  stdout; one job for the whole session (tests only read it, or copy it)."""
  folder, out = once_per_session(tmp_path_factory, 'lmt_job', _job)
  return folder / 'run', out


def test_a_bad_flag_from_a_shell_gives_one_line(tmp_path):
  proc = run_script(SCRIPT, f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', '--c=0', check=False)
  assert_one_line_error(proc, '--c must be positive')
  assert os.listdir(tmp_path) == []


# One launch per kind of failure (absl's parse errors, the launcher's list parsing, the Config's
# own checks, the dataset): each must be one line before any work. The Config's other checks
# are tested on the Config below.
@pytest.mark.parametrize(
  'flag, message',
  [
    ('--dataset=npz:/no/such/file.npz', '/no/such/file.npz'),
    ('--c=0', '--c must be positive'),
    ('--eps=0.1,abc', '--eps must be a comma-separated list of numbers'),
    ('--steps=abc', "flag --steps=abc: invalid literal for int() with base 10: 'abc'"),
    ('--model=resnet', 'flag --model=resnet: value should be one of <mlp|cnn|wrn|liresnet>'),
    ('--stepz=3', "Unknown command line flag 'stepz'"),
    ('--num_processes=2', '--coordinator_address, process_id missing: pass all three of'),
    (
      '--coordinator_address=h:1 --num_processes=2 --process_id=2',
      '--process_id must be in [0, 2), got 2',
    ),
    ('--heartbeat_timeout_s=0 --distributed=on', '--heartbeat_timeout_s must be >= 1 second'),
    ('--distributed=off --process_id=0', '--distributed=off but --coordinator_address'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--workdir={tmp_path}', *flag.split(), check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []  # no work started, nothing written


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(c=0.0), 'c must be positive, got 0.0'),
    (dict(c=-0.5), 'c must be positive'),
    (dict(eps=(-1.0,)), 'eps must be non-negative radii'),
    (dict(eps=()), 'eps must be non-negative radii'),
    (dict(hidden=(32, 0)), 'hidden must be positive integers'),
    (dict(model='wrn', depth=11), 'depth of a WideResNet must be 6n + 4 >= 10, got 11'),
    (dict(model='liresnet', width=3), 'width (LiResNet channels) must be a positive even number'),
    (dict(dense=0), 'dense must be positive'),
    (dict(form='spectral'), 'form must be one of'),
    (dict(steps=0), 'steps must be positive'),
  ],
)
def test_config_names_the_bad_field(fields, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    experiment.Config(**fields)


def test_config_from_notebook_runs_the_same_experiment(tmp_path, finished):
  # The launcher is flags -> Config -> run: the same run from Python, resumable, refusing others.
  # The flag file's settings with TINY's: the LMT model of the 2-process job, in one process.
  config = experiment.Config(
    hidden=(32,), steps=30, learning_rate=3e-3, c=1.0, c_warmup_steps=2000, clip=True,
    eps=(0.1, 0.3), log_every=10, checkpoint_every=20, pgd_steps=5, pgd_restarts=1,
    attack_examples=100, baseline=False, certify_every=20,
  )  # fmt: skip
  lines = []
  results = experiment.run(config, str(tmp_path), log=lines.append)
  assert results['config']['steps'] == 30 and set(results) >= {'lmt', 'config', 'eps'}
  # The curve of certified accuracy against training time: steps 20 and 30 (the end), and its
  # last point is the final model's report (the same certificate, computed during training).
  curve = results['lmt']['curve']
  assert [p['step'] for p in curve] == [20, 30]
  seconds = [p['train_seconds'] for p in curve]
  assert 0 < seconds[0] < seconds[1] <= results['lmt']['train_seconds']
  assert curve[-1]['certified'] == results['lmt']['certified_accuracy']['pairwise']
  assert curve[-1]['clean'] == results['lmt']['clean_accuracy']
  assert 'baseline' not in results and (tmp_path / 'results.json').exists()
  # One process on 8 devices vs 2 x 4: the same parameters to float32 rounding (another order
  # of the gradient sums), the same certificates.
  job = json.loads((finished[0] / 'results.json').read_text())['lmt']
  for key in ('clean_accuracy', 'certified_accuracy', 'violations', 'pgd_robust_accuracy'):
    assert results['lmt'][key] == job[key], key
  assert results['lmt']['lipschitz'] == pytest.approx(job['lipschitz'], rel=1e-5)
  import orbax.checkpoint as ocp

  like = ocp.StandardCheckpointer().metadata(tmp_path / 'lmt' / 'checkpoints' / '30' / 'default')
  like = like.item_metadata if hasattr(like, 'item_metadata') else like
  one, two = (_checkpoint_params(path / 'lmt', like) for path in (tmp_path, finished[0]))
  np.testing.assert_allclose(one, two, rtol=0, atol=1e-5)
  assert experiment.run(config, str(tmp_path), log=lines.append) is None  # complete: nothing
  with pytest.raises(ValueError, match='c=1.0; this one has c=0.5'):
    experiment.run(dataclasses.replace(config, c=0.5), str(tmp_path), log=lines.append)


def _checkpoint_params(run, like) -> np.ndarray:
  """The parameters of the latest checkpoint in `run` (orbax, read as numpy arrays shaped as
  the pytree `like`'s), flattened."""
  import jax
  import orbax.checkpoint as ocp

  step = max(int(p) for p in os.listdir(run / 'checkpoints'))
  target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
  restored = ocp.StandardCheckpointer().restore(run / 'checkpoints' / str(step) / 'default', target)
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(restored['params'])])


@pytest.mark.parametrize('name', ['lmt', 'vgc', 'fourier', 'flatness'])
def test_every_config_field_is_a_flag_with_its_comment_as_help(name):
  import importlib

  text = launch(os.path.join(ROOT, 'experiments', f'{name}.py'), '--helpshort', check=False).stdout
  import common  # importable once a launch put experiments/ on sys.path

  config = importlib.import_module(f'tsuzuku_jax.{name}.experiment').Config
  helps = common.field_help(config)
  for field in dataclasses.fields(config):
    assert helps[field.name], f'{name}.Config.{field.name} has no comment to serve as its help'
    flag = f'--[no]{field.name}:' if isinstance(field.default, bool) else f'--{field.name}:'
    assert flag in text, (flag, text[-3000:])
  assert '--workdir:' in text and '--[no]overwrite:' in text


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  proc = _run(f'--workdir={blocker}/sub', check=False)
  assert_one_line_error(proc, '--workdir', 'is a file, not a directory')
  assert blocker.read_text() == 'keep me'


def test_bad_npz_file_gives_one_line_naming_file_and_key(tmp_path):
  path = tmp_path / 'bad.npz'
  x = np.zeros((20, 4, 4, 1), np.uint8)
  np.savez(path, x_train=x, y_train=np.arange(100, 120), x_test=x, y_test=np.arange(100, 120))
  workdir = tmp_path / 'run'
  proc = _run(f'--workdir={workdir}', f'--dataset=npz:{path}', check=False)
  assert_one_line_error(proc, 'bad.npz', "'y_train'", 'never occur')
  assert not workdir.exists()
  path.write_bytes(b'not a zip file')
  proc = _run(f'--workdir={workdir}', f'--dataset=npz:{path}', check=False)
  assert_one_line_error(proc, 'bad.npz', 'cannot be read')
  assert not workdir.exists()


def test_end_to_end_digits(finished):
  workdir, out = finished
  # Flags after --flagfile override the file.
  assert 'step 30/30' in out
  results = json.loads((workdir / 'results.json').read_text())
  assert results['experiment'] == 'lmt'
  assert results['config']['steps'] == 30 and results['config']['hidden'] == [32]
  record = json.loads((workdir / 'run.json').read_text())
  assert record['experiment'] == 'lmt' and record['config']['steps'] == 30
  assert record['data']['train']['examples'] == 1347 and record['data']['test']['examples'] == 450
  for name in ('lmt', 'baseline'):
    r = results[name]
    assert set(r['certified_accuracy']) == {'global', 'pairwise'}
    assert set(r['certified_accuracy']['pairwise']) == {'0.1', '0.3'}
    # Pairwise bounds are never looser than the global sqrt(2) L form.
    for e in ('0.1', '0.3'):
      assert r['certified_accuracy']['pairwise'][e] >= r['certified_accuracy']['global'][e]
    assert r['violations'] == {'global': 0, 'pairwise': 0}
    assert r['certified_checked']['pairwise'] > 0
    assert r['train_seconds'] > 0 and len(r['params_fingerprint']) == 32
    assert r['lipschitz'] > 0 and r['segments'][-1]['where'] == 'logits'
    for segment in r['segments']:
      assert segment['certificate'] >= segment['converged'] * (1 - 1e-6)
    steps = [json.loads(line)['step'] for line in open(workdir / name / 'metrics.jsonl')]
    assert steps == [10, 20, 30]
  assert os.path.getsize(workdir / 'certified_accuracy.png') > 1000


def test_same_command_on_a_finished_run_changes_nothing(finished):
  workdir, _ = finished
  before = tree_hashes(workdir)
  out = _run(f'--workdir={workdir}', *TINY, '--log_every=5').stdout  # logging may differ
  assert 'complete' in out and 'step ' not in out
  assert tree_hashes(workdir) == before


@pytest.mark.parametrize(
  'flags, named',
  [
    (['--steps=50'], '--steps=30; this one has --steps=50'),
    (['--learning_rate=0.01'], '--learning_rate=0.003; this one has --learning_rate=0.01'),
    (['--seed=1'], '--seed=0; this one has --seed=1'),
    (['--noclip'], '--clip=True; this one has --clip=False'),
  ],
)
def test_other_flags_on_a_finished_run_are_refused(finished, flags, named):
  # Observed: a rerun with --steps=50 resumed the old checkpoint and relabelled its results.
  workdir, _ = finished
  before = tree_hashes(workdir)
  proc = _run(f'--workdir={workdir}', *TINY, *flags, check=False)
  assert_one_line_error(proc, '--workdir', named, '--overwrite')
  assert tree_hashes(workdir) == before


def test_other_data_is_refused(finished, tmp_path):
  from tsuzuku_jax import data

  workdir, _ = finished
  (xtr, ytr), (xte, yte) = data.load('digits', 'train'), data.load('digits', 'test')
  xtr = xtr.copy()
  xtr[0, 0, 0, 0] = 0.5  # one pixel
  path = tmp_path / 'digits.npz'
  np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
  before = tree_hashes(workdir)
  proc = _run(f'--workdir={workdir}', *TINY, f'--dataset=npz:{path}', check=False)
  assert_one_line_error(proc, '--workdir', '--dataset=digits; this one has --dataset=npz:')
  assert tree_hashes(workdir) == before
  # (Same name, other arrays: the fingerprint tells them apart; see workdir_test.py.)


def test_another_launcher_never_replaces_this_run(finished):
  # Observed: experiments/fourier.py on a finished LMT workdir replaced its results.json.
  workdir, _ = finished
  before = tree_hashes(workdir)
  proc = launch(FOURIER, f'--workdir={workdir}', '--steps=5', check=False)
  assert_one_line_error(proc, '--workdir', "holds a 'lmt' run, not 'fourier'")
  assert tree_hashes(workdir) == before


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  proc = _run(f'--workdir={tmp_path}', *TINY, check=False)
  assert_one_line_error(proc, '--workdir', 'notes.txt', 'no run.json')
  assert os.listdir(tmp_path) == ['notes.txt']


def test_overwrite_moves_the_old_run_aside(finished, tmp_path):
  import shutil

  workdir = tmp_path / 'run'
  shutil.copytree(finished[0], workdir)
  before = tree_hashes(workdir)
  out = _run(f'--workdir={workdir}', *TINY, '--steps=20', '--nobaseline', '--overwrite').stdout
  moved = [p for p in tmp_path.iterdir() if p.name.startswith('run.old-')]
  assert len(moved) == 1 and f'moved the previous run in {workdir} to {moved[0]}' in out
  assert tree_hashes(moved[0]) == before  # the old run, intact
  assert json.loads((workdir / 'run.json').read_text())['config']['steps'] == 20
  assert set(json.loads((workdir / 'results.json').read_text())) >= {'lmt', 'experiment'}


def test_diverging_run_stops_with_one_line(tmp_path):
  proc = _run(f'--workdir={tmp_path}', *TINY, '--learning_rate=1e30', '--nobaseline', check=False)
  assert_one_line_error(proc, 'lmt run diverged', 'last good checkpoint')
  assert not os.path.exists(tmp_path / 'results.json')
