"""The run record: claim, resume, refuse with the first difference, move aside; atomic JSON and
the JSON-lines trim used on resume."""

import json
import os
import re

import numpy as np
import pytest

from tsuzuku_jax import data, workdir

DATA = {'name': 'd', 'train': {'examples': 3, 'fingerprint': 'aa'}}


def _open(path, config=None, data_id=None, **kw):
  return workdir.open_run(str(path), 'exp', config or {'a': 1, 'b': [1, 2]}, data_id or DATA, **kw)


def test_new_then_resume(tmp_path):
  path = tmp_path / 'run'
  assert _open(path) == workdir.Run(str(path), False, None)
  record = json.loads((path / 'run.json').read_text())
  assert record['experiment'] == 'exp' and record['config'] == {'a': 1, 'b': [1, 2]}
  assert record['data'] == DATA and record['versions']['jax'] and record['created']
  # Tuples and lists compare equal (both read back as lists); the record is not rewritten.
  before = (path / 'run.json').read_bytes()
  assert _open(path, {'a': 1, 'b': (1, 2)}).resumed
  assert (path / 'run.json').read_bytes() == before


@pytest.mark.parametrize(
  'config, data_id, message',
  [
    ({'a': 2, 'b': [1, 2]}, None, 'holds a run with --a=1; this one has --a=2'),
    ({'a': 1, 'b': [1, 3]}, None, '--b=1,2; this one has --b=1,3'),
    ({'a': 1, 'b': [1, 2], 'c': 0}, None, '--c=<absent>; this one has --c=0'),
    (None, {**DATA, 'train': {'examples': 3, 'fingerprint': 'ab'}}, 'train.fingerprint was aa'),
    # Values that print alike but differ in type (a string list recorded by an older launcher).
    ({'a': 1, 'b': ['1', '2']}, None, re.escape('--b=[1, 2]; this one has --b=["1", "2"]')),
  ],
)
def test_first_difference_named_and_nothing_touched(tmp_path, config, data_id, message):
  _open(tmp_path)
  before = (tmp_path / 'run.json').read_bytes()
  with pytest.raises(workdir.WorkdirMismatch, match=message) as e:
    _open(tmp_path, config, data_id, prefix='--', name='--workdir')
  assert str(e.value).startswith(f'--workdir {tmp_path} holds') and '\n' not in str(e.value)
  assert os.listdir(tmp_path) == ['run.json'] and (tmp_path / 'run.json').read_bytes() == before


def test_neutral_settings_may_differ(tmp_path):
  _open(tmp_path, {'a': 1, 'log_every': 10}, neutral=('log_every',))
  assert _open(tmp_path, {'a': 1, 'log_every': 99}, neutral=('log_every',)).resumed


def test_other_experiment_and_foreign_files(tmp_path):
  workdir.open_run(str(tmp_path / 'x'), 'lmt', {}, DATA)
  with pytest.raises(workdir.WorkdirMismatch, match="holds a 'lmt' run, not 'exp'"):
    _open(tmp_path / 'x')
  (tmp_path / 'y').mkdir()
  (tmp_path / 'y' / 'mine.txt').write_text('keep')
  with pytest.raises(workdir.WorkdirMismatch, match=r'files \(mine.txt\) but no run.json'):
    _open(tmp_path / 'y')
  # A temporary file left by a kill mid-write is not a foreign file.
  (tmp_path / 'z').mkdir()
  (tmp_path / 'z' / 'run.json.tmp').write_text('{"exp')
  assert not _open(tmp_path / 'z').resumed


def test_overwrite_moves_aside_never_deletes(tmp_path):
  path = tmp_path / 'run'
  _open(path)
  (path / 'results.json').write_text('old')
  run = _open(path, {'a': 5}, overwrite=True)
  assert not run.resumed and os.path.basename(run.moved_to).startswith('run.old-')
  assert (tmp_path / os.path.basename(run.moved_to) / 'results.json').read_text() == 'old'
  assert os.listdir(path) == ['run.json']
  again = _open(path, {'a': 6}, overwrite=True)  # a second move the same second gets a suffix
  assert again.moved_to != run.moved_to and os.path.exists(run.moved_to)


def test_unwritable(tmp_path):
  (tmp_path / 'f').write_text('x')
  with pytest.raises(workdir.WorkdirMismatch, match='is a file, not a directory'):
    _open(tmp_path / 'f' / 'run')
  assert (tmp_path / 'f').read_text() == 'x'


def test_write_json_is_atomic_and_trim_jsonl(tmp_path):
  path = str(tmp_path / 'r.json')
  workdir.write_json(path, {'x': np.float32(0.5), 'y': np.arange(2)})
  assert json.loads(open(path).read()) == {'x': 0.5, 'y': [0, 1]}
  assert os.listdir(tmp_path) == ['r.json']
  log = tmp_path / 'metrics.jsonl'
  log.write_text('{"step": 10}\n{"step": 20}\n{"step": 30}\n{"step": 4')  # torn last line
  assert workdir.trim_jsonl(str(log), lambda r: r['step'] <= 20) == 2
  assert log.read_text() == '{"step": 10}\n{"step": 20}\n'


def test_data_fingerprint_tells_arrays_apart():
  x = np.zeros((4, 2, 2, 1), np.float32)
  y = np.arange(4)
  base = data.fingerprint(x, y)
  assert data.fingerprint(x.copy(), y.copy()) == base
  x2 = x.copy()
  x2[3, 1, 1, 0] = 1e-7
  assert data.fingerprint(x2, y) != base
  assert data.fingerprint(x.astype(np.float64), y) != base
  assert data.fingerprint(x.reshape(4, 4, 1, 1), y) != base
  ident = data.identity('d', train=(x, y), test=(x[:2], y[:2]))
  assert ident['train']['examples'] == 4 and ident['test']['image_shape'] == [2, 2, 1]
