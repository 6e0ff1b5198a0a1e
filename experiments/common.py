"""What every launcher shares: one-line errors, the workdir record, the results file.

A launcher defines its flags, then calls `common.run(main)` instead of `absl.app.run(main)`:

- a bad flag value, a bad dataset file, a workdir that holds another run, a diverged run: one
  line `error: ...` on stderr and exit status 2, with nothing on disk changed; the full flag help
  only for `--help`, and a traceback only for a genuine internal error;
- `open_workdir(experiment, data_identity)` claims `--workdir` before any work (see
  `tsuzuku_jax.workdir`): every flag of the launcher is its configuration except the `neutral`
  ones, which cannot change the result (logging cadence, paths);
- `write_results(results)` writes `WORKDIR/results.json` atomically, with the experiment name.
"""

import dataclasses
import os
import sys
from collections.abc import Callable

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tsuzuku_jax import checks, data, train_lib, workdir  # noqa: E402

OVERWRITE = flags.DEFINE_bool(
  'overwrite',
  False,
  'Start afresh in --workdir, moving any previous run there aside to WORKDIR.old-TIME (never '
  'deleted).',
)

# Settings that cannot change a result; every launcher may also name its own.
NEUTRAL = ('workdir', 'overwrite', 'data_dir')
RESULTS = 'results.json'

# Errors the user can fix: reported as one line, without a traceback.
USER_ERRORS = (
  app.UsageError,
  checks.InvalidInput,
  workdir.WorkdirMismatch,
  train_lib.CheckpointMismatch,
  train_lib.TrainingDiverged,
)


def fail(message: str) -> None:
  """Exits with `error: MESSAGE` on one line of stderr, status 2."""
  sys.stderr.write(f'error: {" ".join(str(message).split())}\n')
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl would print the error after the whole flag help
    fail(e)


def run(main) -> None:
  """`absl.app.run(main)` with one-line errors for bad flags and the `USER_ERRORS`."""

  def checked(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(e)

  app.run(checked, flags_parser=_parse_flags)


def workdir_path() -> str:
  return flags.FLAGS.workdir


def check_workdir() -> None:
  """For a launcher's flag validation: --workdir given and writable (nothing is created)."""
  path = workdir_path()
  if not path:
    raise app.UsageError('--workdir is required')
  try:
    workdir.check_writable(path, '--workdir')
  except workdir.WorkdirMismatch as e:
    raise app.UsageError(str(e)) from None


def config() -> dict:
  """Every flag the launcher script defines, and --overwrite, by name: the configuration."""
  own = flags.FLAGS.get_flags_for_module(sys.argv[0])
  return {f.name: f.value for f in own} | {'overwrite': OVERWRITE.value}


def open_workdir(
  experiment: str, data_identity: dict, neutral: tuple[str, ...] = (), extra: dict | None = None
) -> bool:
  """Claims --workdir for this run before any work (see `tsuzuku_jax.workdir.open_run`).

  `extra`: settings resolved at run time that the flags do not pin down (e.g. the number of
  devices behind --workers=0); they belong to the configuration too.

  Returns:
    True when the workdir already holds this run complete (its results file exists): the
    launcher then has nothing to do. False: a new run, or an interrupted one to resume.

  Raises:
    workdir.WorkdirMismatch: another experiment, configuration or data is there; the message
      names the first differing flag and how to proceed. Nothing was touched.
  """
  path = workdir_path()
  record = workdir.open_run(
    path,
    experiment,
    config() | (extra or {}),
    data_identity,
    neutral=NEUTRAL + tuple(neutral),
    overwrite=OVERWRITE.value,
    prefix='--',
    how='use a new --workdir, or add --overwrite to move the old run aside',
    name='--workdir',
  )
  if record.moved_to:
    print(f'moved the previous run in {path} to {record.moved_to}', flush=True)
  results = os.path.join(path, RESULTS)
  if record.resumed and os.path.exists(results):
    print(f'{path} holds this run, complete: {results} (--overwrite redoes it)', flush=True)
    return True
  if record.resumed:
    print(f'resuming the run in {path}', flush=True)
  return False


def write_results(experiment: str, results: dict) -> str:
  """Writes WORKDIR/results.json atomically, tagged with the experiment; returns its path."""
  path = os.path.join(workdir_path(), RESULTS)
  workdir.write_json(path, {'experiment': experiment, **results})
  print(f'wrote {path}', flush=True)
  return path


def config_from_flags(cls, lists: dict[str, tuple[Callable, str]] = (), **given):
  """An experiment's Config from the flags of the same names: one clear line per bad flag,
  before any work.

  Args:
    cls: the experiment's frozen Config dataclass (its fields are the launcher's flags).
    lists: list flags to convert, {name: (element type, what they must be)}; a value that does
      not convert is reported as `--name must be WHAT, got [...]`.
    **given: values that do not come from a flag of the same name (already converted).

  Raises:
    app.UsageError: --workdir missing or unwritable, an unknown dataset, a list element that
      does not convert, or a value the Config refuses (its message, prefixed with '--').
  """
  check_workdir()
  names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
  values = {n: getattr(flags.FLAGS, n) for n in names} | given
  try:
    data.validate_name(values['dataset'])
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  for name, (kind, what) in dict(lists).items():
    try:
      values[name] = tuple(kind(v) for v in values[name])
    except ValueError:
      raise app.UsageError(f'--{name} must be {what}, got {values[name]}') from None
  try:
    return cls(**values)
  except ValueError as e:
    raise app.UsageError(f'--{e}') from None
