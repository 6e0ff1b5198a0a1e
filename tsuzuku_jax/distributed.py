"""Multi-process jobs: joining JAX's distributed runtime, and what every process must agree on.

A pod job runs the same command on every host; each process owns its local devices, and
`jax.devices()` lists all of them, ordered by process. `initialize` joins the job (explicit
coordinator, process count and index, or JAX's own detection on TPU pods, SLURM and Open MPI);
on CPU the collectives across processes go through gloo. `check_same` refuses, on every
process, a job whose processes were started with different settings, before any work.

A process that dies leaves the others blocked in a collective. JAX's runtime ends them after
its heartbeat timeout with a C++ abort (a stack dump, exit status 134); `initialize` starts a
watchdog thread that ends them first, after `heartbeat_timeout_s`, with one line on stderr
naming the lost process and exit status 3 (`LOST`); `finish` tells the others that this
process ended normally (it is then no longer waited for).
"""

import functools
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import numpy as np

from tsuzuku_jax.checks import InvalidInput

T = TypeVar('T')


LOST = 3  # the exit status of a process whose job lost another process

# Multi-host jobs started by a scheduler, recognised from the environment it sets (JAX then
# finds the coordinator, process count and index itself).
SCHEDULERS: dict[str, Callable[[Mapping[str, str]], bool]] = {
  'SLURM': lambda env: 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1,
  'Open MPI': lambda env: int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1,
  'Cloud TPU pod (GKE)': lambda env: ',' in env.get('TPU_WORKER_HOSTNAMES', ''),
  'Cloud TPU multislice': lambda env: 'MEGASCALE_COORDINATOR_ADDRESS' in env,
}


def detect(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-host scheduler this process was started by (a key of `SCHEDULERS`), or None."""
  return next((name for name, found in SCHEDULERS.items() if found(environ)), None)


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool | None = False,
  heartbeat_timeout_s: int = 60,
) -> bool:
  """Joins the job before any JAX computation; True when it has more than one process.

  Pass all three of coordinator_address ('host:port' of process 0), num_processes and
  process_id; or `auto=True` for JAX's environment detection (a GCE TPU VM pod slice, which
  only its metadata server reveals), or `auto=None` for it only where `detect` recognises a
  multi-host scheduler; otherwise nothing is done (a single-process run). A process that stops
  sending heartbeats for `heartbeat_timeout_s` seconds ends the job on every other process
  (the watchdog's one line; JAX's own timeout, twice as long, is the backstop).

  Raises:
    InvalidInput: only some of the three are given, or process_id is not in [0, num_processes).
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}  # fmt: skip
  missing = [k for k, v in given.items() if v is None]
  if 0 < len(missing) < 3:
    raise InvalidInput(f'{", ".join(missing)} missing: pass all three of {", ".join(given)}')
  if not missing and not 0 <= process_id < num_processes:
    raise InvalidInput(f'process_id must be in [0, {num_processes}), got {process_id}')
  if heartbeat_timeout_s < 1:
    raise InvalidInput(f'heartbeat_timeout_s must be >= 1 second, got {heartbeat_timeout_s}')
  if missing and not (auto or (auto is None and detect())):
    return False
  # Without it, XLA:CPU has no collectives across processes (a no-op for accelerators).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id,
    heartbeat_timeout_seconds=2 * heartbeat_timeout_s + 10,
  )  # fmt: skip
  if jax.process_count() == 1:
    return False
  _Watchdog.start(heartbeat_timeout_s)
  sys.excepthook = functools.partial(_excepthook, sys.excepthook, jax.process_index())
  return True


# What a collective reports when another process is gone (gloo on CPU, NCCL, the runtime).
_PEER_LOST = ('Gloo', 'Connection reset', 'Connection closed', 'Socket closed', 'Broken pipe',
              'UNAVAILABLE')  # fmt: skip


def _excepthook(previous, me: int, kind, value, traceback) -> None:
  """An uncaught error of a collective whose peer is gone: `_lost`'s one line, not a traceback
  followed by the runtime's abort at exit."""
  text = str(value)
  if isinstance(value, jax.errors.JaxRuntimeError) and any(m in text for m in _PEER_LOST):
    _lost(me, f'a collective with another process failed ({text.splitlines()[0][:200]})')
  previous(kind, value, traceback)


class _Watchdog:
  """Beats through the coordination service's key-value store (a counter per process, every
  second) and ends this process with one line when another's counter stops for `timeout_s` or
  the coordinator cannot be reached. Peers that called `finish` are not waited for."""

  _stop = threading.Event()
  _thread: threading.Thread | None = None

  @classmethod
  def start(cls, timeout_s: float) -> None:
    from jax._src import distributed as jax_distributed  # the client multihost_utils uses

    client = jax_distributed.global_state.client
    if client is None or cls._thread is not None:
      return
    cls._stop.clear()
    cls._thread = threading.Thread(
      target=cls._watch, args=(client, timeout_s), name='tsuzuku-watchdog', daemon=True
    )
    cls._thread.start()

  @classmethod
  def _watch(cls, client, timeout_s: float) -> None:
    me, n, beat = jax.process_index(), jax.process_count(), 0
    period = min(1.0, timeout_s / 10)
    seen = {p: (None, time.monotonic()) for p in range(n) if p != me}  # last count, when
    failures = 0
    while not cls._stop.wait(period):
      beat += 1
      try:
        client.key_value_set(f'tsuzuku/beat/{me}', str(beat), allow_overwrite=True)
        for p in list(seen):
          if _try_get(client, f'tsuzuku/done/{p}') is not None:
            del seen[p]  # ended normally: nothing more to wait for
            continue
          count = _try_get(client, f'tsuzuku/beat/{p}')
          if count != seen[p][0]:
            seen[p] = (count, time.monotonic())
          elif time.monotonic() - seen[p][1] > timeout_s:
            _lost(me, f'process {p} of {n} sent no heartbeat for {timeout_s:g} s (it stopped '
                  'or was killed)')  # fmt: skip
        failures = 0
      except Exception as e:  # the coordination service (on process 0) is gone
        failures += 1
        if failures * period > min(timeout_s, 5.0):
          _lost(me, f'the job coordinator (process 0) cannot be reached ({str(e).splitlines()[0]})')

  @classmethod
  def finish(cls) -> None:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if cls._thread is None or client is None:
      return
    client.key_value_set(f'tsuzuku/done/{jax.process_index()}', '1', allow_overwrite=True)
    cls.abandon()

  @classmethod
  def abandon(cls) -> None:
    cls._stop.set()
    if cls._thread is not None:
      cls._thread.join()
    cls._thread = None


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # NOT_FOUND: not written yet
    if 'NOT_FOUND' in str(e) or 'not found' in str(e).lower():
      return None
    raise


def _lost(me: int, reason: str) -> None:
  """Ends this process at once (other threads are blocked in a collective) with one line."""
  line = (
    f'error: process {me}: {reason}; stopping this job. Restart every process with the same '
    'command to resume from the last checkpoint\n'
  )
  os.write(sys.stderr.fileno(), line.encode())
  os._exit(LOST)


def finish() -> None:
  """Marks this process's work as done: the other processes' watchdogs stop waiting for it
  (call it at the normal end of a multi-process job; nothing in a single process)."""
  _Watchdog.finish()


def abandon() -> None:
  """Stops this process's heartbeats without marking it done, e.g. before exiting on an error:
  the others then stop within their timeout instead of waiting in a collective."""
  _Watchdog.abandon()


def is_primary() -> bool:
  """Whether this is process 0, the one that writes a run's shared files (records, metrics,
  TensorBoard, results) and prints its progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def in_turn(fn: Callable[[], T], name: str) -> T:
  """`fn()` on process 0, then on the others once it returned or raised (e.g. process 0 writes
  a record that the others then read and check; where it refuses, they refuse the same)."""
  if is_primary():
    try:
      return fn()
    finally:
      barrier(name)
  barrier(name)
  return fn()


def mine(n: int) -> range:
  """This process's share of n items (work units, batches): items p, p + P, ... of process p
  of P (all n in a single process)."""
  return range(jax.process_index(), n, jax.process_count())


def total(value) -> np.ndarray:
  """The sum over processes of each process's `value` (a number or array; itself in a single
  process). Every process must call it."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(value)).sum(0)


def digest(settings: dict) -> str:
  """A short hash of JSON-like settings (key order does not matter)."""
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(settings: dict, what: str = 'settings') -> None:
  """Raises InvalidInput on every process when the processes' `settings` differ (compared by
  hash; nothing to do in a single-process run).

  Raises:
    InvalidInput: naming the processes whose `what` differs from process 0's.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(digest(settings)), np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  other = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if other:
    raise InvalidInput(
      f'processes {other} were started with other {what} than process 0: run the same command '
      'on every host'
    )
