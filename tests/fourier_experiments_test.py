"""The Fourier experiment: flag validation before any work (one launch per kind of failure), the
Config's checks, a tiny end-to-end launch, and the same run from Python.

The tiny run is a job of 2 processes x 4 devices started as a user would on a pod (its heat map
checked against one process's); the other launches run in this process (`launcher.launch`)."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from launcher import assert_one_line_error, launch, tree_hashes
from multiprocess import run_launcher

from tsuzuku_jax import checks
from tsuzuku_jax.fourier import experiment

ROOT = os.path.join(os.path.dirname(__file__), '..')
SCRIPT = os.path.join(ROOT, 'experiments', 'fourier.py')
FLAGFILE = os.path.join(ROOT, 'experiments', 'configs', 'fourier_digits.flags')
TINY = ['--steps=30', '--channels=4,8', '--dense=16', '--random_trials=2', '--uap_steps=5']


def _run(*args, check=True):
  return launch(SCRIPT, *args, check=check)


# One launch per kind of failure (absl's parse errors, the launcher's list parsing, the Config's
# own checks, the dataset, the check against the loaded data): each must be one line before any
# work. The Config's other checks are tested on the Config below.
@pytest.mark.parametrize(
  'flag, message',
  [
    ('--eps=a', '--eps must be non-negative norms or "auto", got (\'a\',)'),
    ('--dataset=npz:/no/such.npz', '/no/such.npz'),
    ('--random_target=1', '--random_target must be in [0, 1)'),
    ('--search=foo', 'flag --search=foo: value should be one of <exhaustive|halving>'),
    ('--search_images=450', '--search_images must be < the 450 test images'),
  ],
)
def test_bad_flag_gives_one_clear_line(tmp_path, flag, message):
  proc = _run(f'--flagfile={FLAGFILE}', f'--workdir={tmp_path}', flag, check=False)
  assert_one_line_error(proc, message)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(eps=(-1.0,)), 'eps must be non-negative norms or "auto", got (-1.0,)'),
    (dict(eps=('a',)), 'eps must be non-negative norms or "auto"'),
    (dict(eps=()), 'eps must hold at least one norm when linf_equivalent is empty'),
    (dict(linf_equivalent=('4/0',)), 'linf_equivalent must be positive numbers or fractions'),
    (dict(linf_equivalent=('-1',)), 'linf_equivalent must be positive numbers or fractions'),
    (dict(linf_equivalent=('x',)), 'linf_equivalent must be positive numbers or fractions'),
    (dict(channels=(4, 0)), 'channels must be positive integers'),
    (dict(dense=0), 'dense must be positive'),
    (dict(random_target=1.0), 'random_target must be in [0, 1), got 1.0'),
    (dict(heat_map_images=-1), 'heat_map_images must be >= 0 (0: all), got -1'),
    (dict(heldout_images=-1), 'heldout_images must be >= 0 (0: all), got -1'),
    (dict(shift_stride=0), 'shift_stride must be >= 1, got 0'),
    (dict(search_images=0), 'search_images must be positive'),
    (dict(search='random'), 'search must be one of'),
    (dict(eta=1), 'eta must be >= 2'),
    (dict(random_trials=0), 'random_trials must be positive'),
    (dict(steps=0), 'steps must be positive'),
  ],
)
def test_config_names_the_bad_field(fields, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    experiment.Config(**fields)


def test_config_accepts_linf_only_and_fractions():
  config = experiment.Config(eps=(), linf_equivalent=('4/255', '0.5'))
  assert experiment.fraction(config.linf_equivalent[0]) == 4 / 255


def _heat_map_of_the_job(path, results):
  """The heat map of the job's trained model, computed again in this process."""
  import jax

  from tsuzuku_jax import data, fourier, loop, models, train_lib

  config = experiment.Config(**{k: v for k, v in results['config'].items() if k != 'eps'})
  model = models.CNN(10, tuple(config.channels), config.dense, batch_norm=False)
  state, _ = train_lib.create_state(model, config.train_config(), (8, 8, 1))
  state = loop.restore_latest(str(path / 'model'), state)
  x, y = data.load('digits', 'test')
  err, _ = fourier.heat_map(
    jax.jit(train_lib.logits_fn(model, state)),
    x,
    y,
    results['heat_map_eps'],
    key=jax.random.key(config.seed),
    batch=256,
  )
  return np.asarray(err[0])


def test_tiny_run(tmp_path):
  # A job of 2 processes x 4 devices, each computing half of the heat map's directions: the map
  # equals one process's on the job's model.
  args = [f'--flagfile={FLAGFILE}', *TINY, '--search=halving', '--eps=auto,1.4',
          '--linf_equivalent=1/8', '--shift_stride=3']  # fmt: skip
  run_launcher(SCRIPT, f'--workdir={tmp_path}', *args, cwd=tmp_path)
  results = json.loads((tmp_path / 'results.json').read_text())
  np.testing.assert_array_equal(results['heat_map_error'], _heat_map_of_the_job(tmp_path, results))
  assert results['experiment'] == 'fourier'
  config = results['config']
  assert config['eps'] == ['auto', 1.4] and config['linf_equivalent'] == ['1/8']
  assert config['channels'] == [4, 8] and config['steps'] == 30 and config['search'] == 'halving'
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


def test_config_from_notebook_runs_the_same_experiment(tmp_path):
  # The launcher is flags -> Config -> run: the same run from Python, resumable, refusing others.
  config = experiment.Config(
    steps=4, channels=(2,), dense=8, eps=(1.0,), search='halving', first_images=4,
    search_images=16, heldout_images=20, heat_map_images=16, shift_stride=4, random_trials=2,
    uap_steps=2,
  )  # fmt: skip
  with pytest.raises(checks.InvalidInput, match='search_images must be < the 450 test images'):
    experiment.run(dataclasses.replace(config, search_images=450), str(tmp_path))
  assert os.listdir(tmp_path) == []
  lines = []
  results = experiment.run(config, str(tmp_path), log=lines.append)
  assert results['config']['steps'] == 4 and results['config']['eps'] == (1.0,)
  assert list(results['per_eps']) == ['1'] and results['heldout_images'] == 20
  assert (tmp_path / 'results.json').exists() and (tmp_path / 'fourier.png').exists()
  assert lines[-1] == f'wrote {tmp_path / "results.json"}'
  assert experiment.run(config, str(tmp_path), log=lines.append) is None  # complete: nothing
  assert 'overwrite=True redoes it' in lines[-1]
  with pytest.raises(ValueError, match='seed=0; this one has seed=1'):
    experiment.run(dataclasses.replace(config, seed=1), str(tmp_path), log=lines.append)
