"""Starts a Python snippet as N local processes of one JAX job (127.0.0.1, a free port), each
with its own fake CPU devices, as a pod would run one command per host.

The snippet reads PORT, PROCESS_ID and NUM_PROCESSES from its environment and calls
`tsuzuku_jax.distributed.initialize` itself; the suite's compiler flags and compilation cache
are kept.
"""

import os
import socket
import subprocess
import sys

from launcher import cpu_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(code: str, tmp_path, n: int = 2, devices: int = 4, timeout: float = 180):
  """Runs `code` in n processes with `devices` CPU devices each; their finished processes."""
  script = os.path.join(str(tmp_path), 'job.py')
  with open(script, 'w') as f:
    f.write(code)
  env = cpu_env(devices, PORT=str(free_port()), NUM_PROCESSES=str(n), PYTHONPATH=ROOT)
  procs = [
    subprocess.Popen(
      [sys.executable, script],
      env={**env, 'PROCESS_ID': str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=str(tmp_path),
    )  # fmt: skip
    for i in range(n)
  ]
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:
      p.kill()
  return out
