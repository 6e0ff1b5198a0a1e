"""Runs an experiments/ launcher in a subprocess on the CPU, as a user would from a shell; checks
that it failed with one clear line; hashes a folder (to show nothing changed); loads a
benchmarks/ script as a module (its main(argv) is then called in-process)."""

import importlib.util
import os
import subprocess
import sys


def run_script(script: str, *args: str, check: bool = True, devices: int = 1):
  """`python script args...` with JAX on the CPU and `devices` fake devices (the suite's other
  compiler flags and compilation cache kept); the finished process.

  Raises AssertionError with the output when `check` and the exit status is non-zero.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags)}
  proc = subprocess.run(
    [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=600
  )
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
