"""A run's workdir is a record: `run.json` says what it holds; nothing written is lost.

`open_run` is called before any work. In an empty (or new) directory it writes `run.json`:
the experiment, its full configuration, the identity of its data (`data.identity`), the
package and jax versions and the time. In a directory that already has one, it resumes only a
run of the same experiment, configuration and data; otherwise it raises `WorkdirMismatch`
naming the first difference, having touched nothing. With `overwrite=True` the old directory
is renamed aside (`WORKDIR.old-YYYYmmdd-HHMMSS`), never deleted, and a fresh run starts.

Files are written atomically (`write_json`: a temporary file renamed into place), so a run
killed at any moment leaves either the old file or the new one, never half of one.
`trim_jsonl` makes an append-only log agree with the checkpoint a run resumes from.
"""

import datetime
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np

RUN_FILE = 'run.json'


class WorkdirMismatch(ValueError):
  """The workdir holds another run (or files that are not a run); nothing was touched."""


class Run(NamedTuple):
  path: str  # the workdir
  resumed: bool  # True: a matching run.json was there (the run continues or is complete)
  moved_to: str | None  # where `overwrite` moved a previous run, or None


def _replace(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
  """Writes `path` atomically: `write(file)` into a temporary file, fsync, rename."""
  tmp = f'{path}.tmp'
  with open(tmp, 'wb' if binary else 'w') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (temporary file, fsync, rename)."""
  _replace(path, lambda f: json.dump(obj, f, indent=1, default=_jsonable))


def write_npz(path: str, **arrays) -> None:
  """Writes numpy arrays to `path` (.npz) atomically (temporary file, fsync, rename)."""
  _replace(path, lambda f: np.savez(f, **arrays), binary=True)


def _jsonable(x):
  """numpy / jax scalars and arrays, tuples inside dataclasses, and anything else by repr."""
  if hasattr(x, 'tolist'):
    return x.tolist()
  return repr(x)


def normalize(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples -> lists, numpy scalars -> numbers)."""
  return json.loads(json.dumps(obj, default=_jsonable))


def check_writable(path: str, name: str = 'workdir') -> None:
  """Raises WorkdirMismatch unless `path` is, or can be created as, a writable directory.
  Creates nothing: the nearest existing ancestor must be a writable directory."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise WorkdirMismatch(f'{name} {path}: {probe} is a file, not a directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise WorkdirMismatch(f'{name} {path} is not writable ({probe} denies writing)')


def _first_difference(old: Any, new: Any, where: str = '') -> tuple[str, Any, Any] | None:
  if isinstance(old, dict) and isinstance(new, dict):
    for k in sorted(set(old) | set(new)):
      d = _first_difference(old.get(k, '<absent>'), new.get(k, '<absent>'), f'{where}.{k}')
      if d:
        return d
    return None
  return None if old == new else (where.lstrip('.'), old, new)


def read_run(workdir: str) -> dict | None:
  """The workdir's run.json as a dict, or None when there is none.

  Raises:
    WorkdirMismatch: run.json exists but is not readable JSON.
  """
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirMismatch(f'{path} is not a readable run record ({e})') from None


def move_aside(workdir: str) -> str:
  """Renames `workdir` to a free `WORKDIR.old-YYYYmmdd-HHMMSS[-k]` beside it; returns the name."""
  base = os.path.normpath(os.path.abspath(workdir))
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  target, k = f'{base}.old-{stamp}', 1
  while os.path.exists(target):
    k += 1
    target = f'{base}.old-{stamp}-{k}'
  os.rename(base, target)
  return target


def open_run(
  workdir: str,
  experiment: str,
  config: Mapping[str, Any],
  data: Mapping[str, Any],
  *,
  neutral: Iterable[str] = (),
  overwrite: bool = False,
  prefix: str = '',
  how: str = 'use a new workdir, or overwrite=True to move the old run aside',
  name: str = 'workdir',
) -> Run:
  """Claims `workdir` for this run, or resumes the same run; call it before any work.

  Args:
    workdir: the run's directory (created if absent).
    experiment: the experiment's name ('lmt', 'vgc', 'fourier', 'flatness', ...).
    config: the full resolved configuration, JSON-serialisable (e.g. every flag's value).
    data: the data identity (`data.identity(...)`).
    neutral: config keys that cannot change the result (logging cadence, output paths): they
      are recorded but may differ on a resume.
    overwrite: move any previous content aside (never deleted) and start afresh.
    prefix: how config keys are named in messages ('--' for flags).
    how: what the user can do about a mismatch, appended to the message.
    name: how the workdir is named in messages ('--workdir' for a flag).

  Returns:
    A `Run`: whether a matching run was resumed, and where an overwritten one was moved.

  Raises:
    WorkdirMismatch: the workdir holds another experiment, another configuration (the first
      differing setting is named, with both values), other data, or files but no run.json;
      or it cannot be written. Nothing on disk was changed.
  """
  check_writable(workdir, name)
  new = normalize(
    {
      'experiment': experiment,
      'config': dict(config),
      'data': dict(data),
    }
  )
  moved = None
  if _contents(workdir):
    old = read_run(workdir)
    problem = _mismatch(workdir, name, old, new, set(neutral), prefix)
    if problem is None and not overwrite:
      return Run(workdir, True, None)
    if problem is not None and not overwrite:
      raise WorkdirMismatch(f'{problem}; {how}')
    moved = move_aside(workdir)
  os.makedirs(workdir, exist_ok=True)
  record = {
    **new,
    'neutral': sorted(neutral),
    'versions': _versions(),
    'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  write_json(os.path.join(workdir, RUN_FILE), record)
  return Run(workdir, False, moved)


def _contents(workdir: str) -> list[str]:
  """The directory's entries, sorted, without temporary files left by a kill mid-write."""
  if not os.path.isdir(workdir):
    return []
  return sorted(f for f in os.listdir(workdir) if not f.endswith('.tmp'))


def _versions() -> dict:
  """Versions of the code that wrote the record (informative: not compared on resume)."""
  out = {}
  for name in ('tsuzuku_jax', 'jax', 'flax', 'optax', 'orbax-checkpoint'):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def _mismatch(workdir, name, old: dict | None, new: dict, neutral: set, prefix) -> str | None:
  """A one-line description of the first difference between two records, or None."""
  where = f'{name} {workdir}'
  if old is None:
    listing = _contents(workdir)
    shown = ', '.join(listing[:4]) + (', ...' if len(listing) > 4 else '')
    return (
      f'{where} holds files ({shown}) but no {RUN_FILE}: it is not a run of this '
      'experiment (or one from before run records)'
    )
  if old.get('experiment') != new['experiment']:
    return f'{where} holds a {old.get("experiment")!r} run, not {new["experiment"]!r}'
  keep = lambda c: {k: v for k, v in (c or {}).items() if k not in neutral}  # noqa: E731
  d = _first_difference(keep(old.get('config')), keep(new['config']))
  if d:
    key, was, now = d
    show = _show
    if _show(was) == _show(now):  # e.g. ['32', '64'] recorded by an older launcher vs [32, 64]
      show = json.dumps
    return (
      f'{where} holds a run with {prefix}{key}={show(was)}; this one has {prefix}{key}={show(now)}'
    )
  d = _first_difference(old.get('data'), new['data'])
  if d:
    key, was, now = d
    return f'{where} holds a run on other data: {key} was {_show(was)}, now {_show(now)}'
  return None


def _show(v: Any) -> str:
  if isinstance(v, list):
    return ','.join(str(x) for x in v)
  return str(v)


def file_hashes(root: str) -> dict[str, str]:
  """{path relative to root: sha256 of its bytes} for every file under `root`: equal before and
  after an operation means it changed nothing on disk."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return dict(sorted(out.items()))


def trim_jsonl(path: str, keep: Callable[[dict], bool]) -> int:
  """Rewrites the JSON-lines file `path` keeping the records for which `keep` is true, and
  dropping a torn last line (a run killed mid-write); atomic. Returns the lines kept."""
  if not os.path.exists(path):
    return 0
  kept = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      if isinstance(rec, dict) and keep(rec):
        kept.append(line if line.endswith('\n') else line + '\n')
  _replace(path, lambda f: f.writelines(kept))
  return len(kept)


# The experiments' progress lines: flushed, so they interleave with subprocess output in order.
print_flushed = functools.partial(print, flush=True)


def claim_experiment(
  path: str,
  experiment: str,
  config: Mapping[str, Any],
  data: Mapping[str, Any],
  *,
  neutral: Iterable[str] = (),
  overwrite: bool = False,
  cli: bool = False,
  log: Callable[[str], None] = print_flushed,
) -> bool:
  """`open_run` for an experiment's `run(config, path)`, with its progress lines; True when
  `path` already holds this run complete (its results.json exists: nothing to do).

  `cli`: name settings and the workdir as flags ('--c', '--workdir', '--overwrite') in messages.

  In a multi-process job every process calls it: the processes' settings and data must agree
  (`distributed.check_same`), then process 0 claims the workdir (moving an old run aside) and
  the others check the record it wrote.
  """
  from tsuzuku_jax import distributed  # jax: only when an experiment runs

  distributed.check_same(
    normalize({'experiment': experiment, 'config': dict(config), 'data': dict(data),
               'path': os.path.abspath(path), 'overwrite': overwrite}),
    'flags' if cli else 'settings',
  )  # fmt: skip
  claim = lambda: open_run(  # noqa: E731
    path, experiment, config, data, neutral=neutral,
    overwrite=overwrite and distributed.is_primary(), prefix='--' if cli else '',
    how=('use a new --workdir, or add --overwrite to move the old run aside' if cli else
         'use a new workdir, or overwrite=True to move the old run aside'),
    name='--workdir' if cli else 'workdir',
  )  # fmt: skip
  record = distributed.in_turn(claim, f'claim {experiment} workdir')
  if record.moved_to:
    log(f'moved the previous run in {path} to {record.moved_to}')
  results_path = os.path.join(path, 'results.json')
  if record.resumed and os.path.exists(results_path):
    redo = '--overwrite' if cli else 'overwrite=True'
    log(f'{path} holds this run, complete: {results_path} ({redo} redoes it)')
    return True
  if record.resumed:
    log(f'resuming the run in {path}')
  return False
