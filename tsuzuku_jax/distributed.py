"""Multi-process jobs: joining JAX's distributed runtime, and what every process must agree on.

A pod job runs the same command on every host; each process owns its local devices, and
`jax.devices()` lists all of them, ordered by process. `initialize` joins the job (explicit
coordinator, process count and index, or JAX's own detection on TPU pods, SLURM and Open MPI);
on CPU the collectives across processes go through gloo. `check_same` refuses, on every
process, a job whose processes were started with different settings, before any work.
"""

import hashlib
import json
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from tsuzuku_jax.checks import InvalidInput

T = TypeVar('T')


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
  heartbeat_timeout_s: int = 100,
) -> bool:
  """Joins the job before any JAX computation; True when it has more than one process.

  Pass all three of coordinator_address ('host:port' of process 0), num_processes and
  process_id, or `auto=True` for JAX's environment detection, or nothing for a single-process
  run (nothing is done). A process that stops sending heartbeats for `heartbeat_timeout_s`
  seconds ends the job on every other process.

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
  if missing and not auto:
    return False
  # Without it, XLA:CPU has no collectives across processes (a no-op for accelerators).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s
  )
  return jax.process_count() > 1


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
  """`fn()` on process 0, then on the others once it returned (e.g. process 0 writes a record
  that the others then read and check)."""
  if is_primary():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


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
