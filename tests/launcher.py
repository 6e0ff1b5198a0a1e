"""Runs an experiments/ launcher as a user would from a shell: in a subprocess (`run_script`, one
end-to-end smoke run per launcher) or in this process (`launch`: the same flag parsing, checks
and one-line errors without seconds of imports per call); checks that it failed with one clear
line; hashes a folder (to show nothing changed); loads a benchmarks/ script as a module (its
main(argv) is then called in-process)."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment for a child on the CPU with `devices` fake devices (the suite's
  other compiler flags and compilation cache kept), plus `extra`."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags), **extra}


def run_script(script: str, *args: str, check: bool = True, devices: int = 1):
  """`python script args...` with JAX on the CPU and `devices` fake devices (the suite's other
  compiler flags and compilation cache kept); the finished process.

  Raises AssertionError with the output when `check` and the exit status is non-zero.
  """
  proc = subprocess.run(
    [sys.executable, script, *args], capture_output=True, text=True, env=cpu_env(devices),
    timeout=600,
  )  # fmt: skip
  if check and proc.returncode:
    raise AssertionError(proc.stdout + proc.stderr)
  return proc


# Names of the flags the launcher last loaded by `launch` defined (absl's registry is global, and
# the launchers define flags of the same names).
_DEFINED: set[str] = set()


def launch(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  """`python script args...` in this process: the launcher is loaded afresh (its flags replace
  the previous launcher's, every flag back at its default) and run through `common.run` (absl's
  app.run, which re-parses the flags on a rerun); stdout and stderr are captured and the exit
  status is that of its SystemExit. JAX sees this process's devices (8 fake CPU devices).

  Raises AssertionError with the output when `check` and the exit status is non-zero.
  """
  from absl import flags

  for name in _DEFINED:
    delattr(flags.FLAGS, name)
  name = script  # absl files a script's flags under sys.argv[0] (--helpshort lists those)
  spec = importlib.util.spec_from_file_location(name, script)
  module = importlib.util.module_from_spec(spec)
  folder = os.path.dirname(os.path.abspath(script))
  if folder not in sys.path:  # as `python script` puts it there, for `import common`
    sys.path.insert(0, folder)
  sys.modules[name] = module  # absl finds the defining module there
  try:
    spec.loader.exec_module(module)  # defines its flags
  finally:
    del sys.modules[name]
  _DEFINED.clear()
  _DEFINED.update(f.name for f in flags.FLAGS.flags_by_module_dict()[name])
  flags.FLAGS.unparse_flags()  # flags a previous launch set, --overwrite among them
  import common

  out, err, argv = io.StringIO(), io.StringIO(), [script, *args]
  code, saved_argv = 0, sys.argv
  try:
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      common.run(module.main)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(bool(e.code))
  finally:
    sys.argv = saved_argv
  proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
  if check and proc.returncode:
    raise AssertionError(proc.stdout + proc.stderr)
  return proc


def load_benchmark(name: str):
  """The module benchmarks/{name}.py, loaded from its path (benchmarks/ is not a package)."""
  path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_one_line_error(proc, *needles: str) -> None:
  """The process failed with exactly one `error: ...` line on stderr holding every needle, and
  no traceback or flag help."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def tree_hashes(root) -> dict[str, str]:
  """{relative path: sha256} of every file under `root` (`workdir.file_hashes`)."""
  from tsuzuku_jax import workdir

  return workdir.file_hashes(str(root))


def once_per_session(tmp_path_factory, name: str, make):
  """`(folder, make(folder))`, made by one pytest-xdist worker in a folder every worker sees (a
  module fixture would be made once per worker: a multi-process job each time); the others wait
  for it. `make` returns JSON values. The folder is shared: what uses it only reads it (or
  copies it first)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base  # this session's
  folder, lock, done = root / name, root / f'{name}.lock', root / f'{name}.json'
  try:
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
  except FileExistsError:  # another worker makes it
    deadline = time.monotonic() + 900
    while not done.exists():
      if time.monotonic() > deadline:
        raise TimeoutError(f'{name}: not made after 900 s') from None
      time.sleep(0.5)
  else:
    try:
      result = {'ok': make(folder)}
    except BaseException as e:  # the waiting workers fail with its message, not a timeout
      result = {'error': f'{type(e).__name__}: {e}'}
    (root / f'{name}.tmp').write_text(json.dumps(result))
    os.replace(root / f'{name}.tmp', done)
  result = json.loads(done.read_text())
  if 'error' in result:
    raise RuntimeError(f'{name} failed in the worker that made it: {result["error"]}')
  return folder, result['ok']
