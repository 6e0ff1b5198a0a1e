"""What every launcher shares: flags made from an experiment's Config, one-line errors, `main`.

A launcher is its experiment's Config as flags:

  main = common.main(experiment)  # one flag per Config field; flags -> Config -> run
  if __name__ == '__main__':
    common.run(main)

- Each Config field becomes a flag of the same name: bool, int, float, str, or a comma-separated
  list for a tuple field (converted element by element from its annotation); `bool | None` is
  an enum default|true|false. Its help is the field's comment in the Config's source (on its
  line, or the comment lines right above it); `Config.CHOICES` makes a field an enum flag.
- `--workdir` (where the run lives; see `tsuzuku_jax.workdir`) and `--overwrite` are every
  launcher's. A later invocation resumes only the same flags and data.
- Multi-process (pod) jobs: the same command on every host, with `--coordinator_address`,
  `--num_processes` and `--process_id` (or a scheduler JAX detects: SLURM, Open MPI, Cloud TPU;
  `--distributed=on` for a GCE TPU VM slice), `--heartbeat_timeout_s` (see
  `tsuzuku_jax.distributed`). The processes' flags must agree (refused otherwise); process 0
  prints the progress and writes the shared files; the workdir must be one shared folder.
- A bad flag value, a bad dataset file, a workdir that holds another run, a diverged run: one
  line `error: ...` on stderr and exit status 2, with nothing on disk changed; the full flag
  help only for `--help`, and a traceback only for a genuine internal error.
"""

import ast
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tsuzuku_jax import checks, data, distributed, progress, train_lib, workdir  # noqa: E402

WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (the run record, results).')
OVERWRITE = flags.DEFINE_bool(
  'overwrite',
  False,
  'Start afresh in --workdir, moving any previous run there aside to WORKDIR.old-TIME (never '
  'deleted).',
)
COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, "Multi-process job: process 0's host:port (every process)."
)
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process job: processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process job: this process, 0-based.')
DISTRIBUTED = flags.DEFINE_enum(
  'distributed', 'auto', ['auto', 'on', 'off'],
  'Join a multi-process job: auto (when the three flags above are given or a multi-host '
  'scheduler is detected: SLURM, Open MPI, Cloud TPU on GKE), on (JAX detects the job, e.g. a '
  'GCE TPU VM pod slice), off.',
)  # fmt: skip
HEARTBEAT = flags.DEFINE_integer(
  'heartbeat_timeout_s', 60,
  'Multi-process job: a process silent this long ends the job on the others (one error line).',
)  # fmt: skip
_JOB_FLAGS = ('workdir', 'overwrite', 'coordinator_address', 'num_processes', 'process_id',
              'distributed', 'heartbeat_timeout_s')  # fmt: skip

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
      out = main(argv)
    except USER_ERRORS as e:
      distributed.abandon()  # the other processes stop within their timeout, not wait
      fail(e)
    except BaseException:
      distributed.abandon()
      raise
    distributed.finish()
    return out

  app.run(checked, flags_parser=_parse_flags)


def check_workdir() -> None:
  """For a launcher's flag validation: --workdir given and writable (nothing is created)."""
  path = WORKDIR.value
  if not path:
    raise app.UsageError('--workdir is required')
  try:
    workdir.check_writable(path, '--workdir')
  except workdir.WorkdirMismatch as e:
    raise app.UsageError(str(e)) from None


def field_help(cls) -> dict[str, str]:
  """{field: help} from the comments of a dataclass's source: the comment on the field's line,
  else the comment lines right above it."""
  source = textwrap.dedent(inspect.getsource(cls))
  comments, alone = {}, set()  # line number -> comment text; lines holding only a comment
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row = tok.start[0]
      comments[row] = tok.string.lstrip('#').strip()
      if not tok.line[: tok.start[1]].strip():
        alone.add(row)
  out = {}
  for node in ast.parse(source).body[0].body:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      row = node.end_lineno
      if row in comments and row not in alone:
        out[node.target.id] = comments[row]
        continue
      above, row = [], node.lineno - 1
      while row in alone:
        above.insert(0, comments[row])
        row -= 1
      out[node.target.id] = ' '.join(above)
  return out


def _element(hint):
  """The element type of a `tuple[X, ...]` hint, or None for a scalar field."""
  if typing.get_origin(hint) is tuple:
    return typing.get_args(hint)[0]
  return None


def _is_optional_bool(hint) -> bool:
  return isinstance(hint, types.UnionType) and set(typing.get_args(hint)) == {bool, type(None)}


def _caller_module() -> str:
  """absl's name of the module calling the caller: a script's is sys.argv[0]."""
  caller = sys._getframe(2).f_globals['__name__']
  return sys.argv[0] if caller == '__main__' else caller


def define_flags(cls, module: str) -> None:
  """One flag per field of the dataclass `cls` (see the module docstring), registered for the
  launcher `module` (absl's module name: its --helpshort lists them)."""
  hints, helps = typing.get_type_hints(cls), field_help(cls)
  choices = getattr(cls, 'CHOICES', {})
  for name in _JOB_FLAGS:  # listed in the launcher's --helpshort too
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])
  for f in dataclasses.fields(cls):
    hint, default, text = hints[f.name], f.default, helps.get(f.name) or f.name
    kw = dict(module_name=module)
    if f.name in choices:
      flags.DEFINE_enum(f.name, default, list(choices[f.name]), text, **kw)
    elif _element(hint) is not None:
      flags.DEFINE_list(f.name, [str(v) for v in default], text, **kw)
    elif _is_optional_bool(hint):
      value = {None: 'default', True: 'true', False: 'false'}[default]
      flags.DEFINE_enum(f.name, value, ['default', 'true', 'false'], text, **kw)
    elif hint is bool:
      flags.DEFINE_bool(f.name, default, text, **kw)
    elif hint is int:
      flags.DEFINE_integer(f.name, default, text, **kw)
    elif hint is float:
      flags.DEFINE_float(f.name, default, text, **kw)
    else:
      flags.DEFINE_string(f.name, default, text, **kw)


_WHAT = {int: 'integers', float: 'numbers', str: 'words'}


def _convert(kind, text: str):
  if isinstance(kind, types.UnionType):  # e.g. float | str: a number where it parses as one
    try:
      return float(text)
    except ValueError:
      return text
  return kind(text)


def config_from_flags(cls):
  """An experiment's Config from the flags `define_flags(cls)` made: one clear line per bad
  flag, before any work.

  Raises:
    app.UsageError: --workdir missing or unwritable, an unknown dataset, a list element that
      does not convert, or a value the Config refuses (its message, prefixed with '--').
  """
  check_workdir()
  hints, values = typing.get_type_hints(cls), {}
  for f in dataclasses.fields(cls):
    value, kind = getattr(flags.FLAGS, f.name), _element(hints[f.name])
    if kind is not None:
      try:
        value = tuple(_convert(kind, v) for v in value)
      except ValueError:
        what = _WHAT.get(kind, 'values')
        message = f'--{f.name} must be a comma-separated list of {what}, got {value}'
        raise app.UsageError(message) from None
    elif _is_optional_bool(hints[f.name]):
      value = {'default': None, 'true': True, 'false': False}[value]
    values[f.name] = value
  try:
    data.validate_name(values['dataset'])
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  try:
    return cls(**values)
  except ValueError as e:
    raise app.UsageError(f'--{e}') from None


def join_job() -> None:
  """Joins the multi-process job the flags describe (nothing for a single process).

  Raises:
    app.UsageError: only some of --coordinator_address, --num_processes, --process_id, a
      process id out of range, or a heartbeat timeout below 1 s.
  """
  mode = {'auto': None, 'on': True, 'off': False}[DISTRIBUTED.value]
  given = (COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  if mode is False and any(v is not None for v in given):
    raise app.UsageError('--distributed=off but --coordinator_address/--num_processes/'
                         '--process_id given')  # fmt: skip
  try:
    distributed.initialize(*given, auto=mode, heartbeat_timeout_s=HEARTBEAT.value)
  except checks.InvalidInput as e:
    raise app.UsageError(f'--{e}') from None


def main(experiment) -> Callable:
  """Defines the calling launcher's flags from `experiment.Config` (`define_flags`) and returns
  its main: flags -> Config -> joining the job -> `experiment.run(config, --workdir)`, whose
  progress process 0 prints."""
  define_flags(experiment.Config, _caller_module())

  def launch(argv):
    del argv
    config = config_from_flags(experiment.Config)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    join_job()
    experiment.run(config, WORKDIR.value, overwrite=OVERWRITE.value, cli=True,
                   log=progress.print_on_process_0)  # fmt: skip

  return launch
