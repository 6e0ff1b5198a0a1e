"""Starts N local processes of one JAX job (127.0.0.1, a free port), each with its own fake CPU
devices, as a pod would run one command per host: a launcher with the job flags
(`run_launcher`), or a Python snippet (`run_processes`) that reads PORT, PROCESS_ID and
NUM_PROCESSES from its environment and calls `tsuzuku_jax.distributed.initialize` itself. The
suite's compiler flags and compilation cache are kept.
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


def start(argv, n: int, devices: int, cwd, extra=lambda i: ()) -> list[subprocess.Popen]:
  """`python argv... extra(i)...` as processes i = 0..n-1 with `devices` CPU devices each."""
  env = cpu_env(devices, PORT=str(free_port()), NUM_PROCESSES=str(n), PYTHONPATH=ROOT)
  return [
    subprocess.Popen(
      [sys.executable, *argv, *extra(i)],
      env={**env, 'PROCESS_ID': str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=str(cwd),
    )  # fmt: skip
    for i in range(n)
  ]


def run_launcher(script, *args, cwd, n: int = 2, devices: int = 4, timeout: float = 300):
  """The launcher `script` with `args` as an n-process job; their finished processes.

  Raises AssertionError with a process's output when one fails."""
  port = free_port()
  job = lambda i: (f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}',  # noqa: E731
                   f'--process_id={i}', '--heartbeat_timeout_s=30')  # fmt: skip
  out = wait(start([script, *args], n, devices, cwd, job), timeout)
  for i, p in enumerate(out):
    if p.returncode:
      raise AssertionError(f'process {i}: exit {p.returncode}\n{p.stdout}{p.stderr}')
  return out


def run_processes(code: str, tmp_path, n: int = 2, devices: int = 4, timeout: float = 180):
  """Runs `code` in n processes with `devices` CPU devices each; their finished processes."""
  script = os.path.join(str(tmp_path), 'job.py')
  with open(script, 'w') as f:
    f.write(code)
  return wait(start([script], n, devices, tmp_path), timeout)


def wait(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
  """Waits for every process (killing all of them after `timeout` s); their outputs."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:
      p.kill()
  return out
