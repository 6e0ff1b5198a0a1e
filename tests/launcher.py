"""Runs an experiments/ launcher in a subprocess on the CPU, as a user would from a shell."""

import os
import subprocess
import sys


def run_script(script: str, *args: str, check: bool = True, devices: int = 1):
  """`python script args...` with JAX on the CPU and `devices` fake devices; the finished process.

  Raises AssertionError with the output when `check` and the exit status is non-zero.
  """
  xla = f'--xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla}
  proc = subprocess.run(
    [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=600
  )
  if check and proc.returncode:
    raise AssertionError(proc.stdout + proc.stderr)
  return proc
