"""The one training loop: steps, progress, metrics.jsonl, TensorBoard, orbax checkpoints, resume.

`run(state, train_step, batches, schedule, workdir)` drives any jitted
`train_step(state, batch) -> (state, metrics)` whose state is a NamedTuple of arrays with a
`step` field (`train_lib.TrainState`, `vgc.data_parallel.DPState`). Every `log_every` steps (and
at checkpoints and the end) it averages the window's metrics on the host, stops on a NaN/Inf
loss, adds what `on_log` returns (a test accuracy, byte counts), appends one line to
`workdir/metrics.jsonl`, writes the scalars to TensorBoard (`workdir/tensorboard`) and prints a
progress line with an ETA that leaves out compilation. A run restarted on the same workdir
resumes from the last checkpoint: metrics lines past it are dropped (those steps are redone,
identically when the data order depends only on (seed, epoch)) and the records before it are
returned with the new ones, so a result built from the records is the same as an
uninterrupted run's. Without a workdir nothing is written and nothing resumes (notebooks).

In a multi-process job a state on devices of several processes makes a shared run: every
process steps and saves its part of each checkpoint, process 0 alone writes metrics.jsonl and
TensorBoard and prints. A state on this process's devices only makes a process-local run (e.g.
one model of a zoo whose models are shared out among the processes): it writes its metrics
itself, waits for no other process, and keeps no checkpoint (orbax saves host-local arrays
only on process 0), so an interrupted one restarts from its first step.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from tsuzuku_jax import distributed, progress
from tsuzuku_jax import workdir as record


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of another model or optimiser (left untouched on disk)."""


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a run is and how often it logs and checkpoints."""

  steps: int
  per_epoch: int  # batches(epoch) yields this many batches
  log_every: int = 100
  checkpoint_every: int = 1000
  max_checkpoints: int = 2


def is_shared(state) -> bool:
  """Whether `state` lives on devices of more than this process (a multi-process run)."""
  return not all(getattr(a, 'is_fully_addressable', True) for a in jax.tree.leaves(state))


def manager(workdir: str, max_checkpoints: int = 2):
  """The orbax checkpoint manager of `workdir/checkpoints`."""
  # orbax is imported here so that importing the library (and train steps alone) works without it.
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=max_checkpoints, create=True)
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def restore_latest(workdir: str, state, max_checkpoints: int = 2):
  """The latest checkpoint in `workdir` as `state`'s type, placed as `state` is (or `state`
  unchanged when there is none).

  Raises:
    CheckpointMismatch: the checkpoint holds other arrays (left untouched on disk).
  """
  import orbax.checkpoint as ocp

  mngr = manager(workdir, max_checkpoints)
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
  # Compare the stored shapes first: a failed orbax restore leaves its async reads dangling.
  stored = sorted(str(tuple(m.shape)) for m in jax.tree.leaves(mngr.item_metadata(step)))
  wanted = sorted(str(tuple(a.shape)) for a in jax.tree.leaves(abstract))
  how = 'use a new --workdir'
  if stored != wanted:
    raise CheckpointMismatch(
      f'the checkpoint at step {step} in {workdir}/checkpoints does not match this model and '
      f'optimiser ({len(stored)} stored arrays vs {len(wanted)} expected, or different '
      f'shapes); {how}'
    )
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointMismatch(
      f'the checkpoint at step {step} in {workdir}/checkpoints does not match this model and '
      f'optimiser ({type(e).__name__}: {str(e)[:300]}); {how}'
    ) from e
  return type(state)(**restored)


def read_records(workdir: str | None) -> list[dict]:
  """The lines of `workdir/metrics.jsonl` ([] without one)."""
  path = None if workdir is None else os.path.join(workdir, 'metrics.jsonl')
  if path is None or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _window_mean(window: list[dict], step: int, workdir: str | None, mngr) -> tuple[dict, list]:
  """(host mean of each scalar metric over the window, the window on the host); raises on a
  NaN/Inf metric."""
  host = jax.device_get(window)
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if np.ndim(host[0][k]) == 0}
  if not all(np.isfinite(np.asarray(v)).all() for m in host for v in m.values()):
    kept = 'nothing was saved (no workdir)'
    if mngr is not None:
      kept = (
        f'the last good checkpoint (step {mngr.latest_step()}) is kept in {workdir}/checkpoints'
      )
    raise TrainingDiverged(f'loss is {mean.get("loss")} at step {step}: stopping; {kept}')
  return mean, host


def _shown(rec: dict, shown: Iterable[str]) -> str:
  return ''.join(f' {k} {rec[k]:.4g}' for k in shown if isinstance(rec.get(k), int | float))


def run(
  state,
  train_step: Callable,
  batches: Callable[[int], Iterable[Any]],
  schedule: Schedule,
  workdir: str | None,
  *,
  label: str = 'step',
  shown: tuple[str, ...] = ('loss', 'accuracy'),
  on_log: Callable[[int, Any, list[dict]], dict] | None = None,
  until: Callable[[Any], bool] | None = None,
  log: Callable[[str], None] = print,
) -> tuple[Any, list[dict]]:
  """Runs (or resumes) `train_step` until `schedule.steps`; returns `(state, records)`.

  Args:
    state: the initial state (a NamedTuple with `step`), placed on devices as the step wants.
    train_step: jitted `(state, batch) -> (state, metrics)`, metrics a dict of device scalars
      (and arrays, which `on_log` may read but are not averaged).
    batches: `batches(epoch)` yields the epoch's `schedule.per_epoch` batches in a fixed order.
    schedule: steps, epoch length, logging and checkpoint intervals.
    workdir: where metrics.jsonl, tensorboard/ and checkpoints/ go; None writes nothing.
    label: the progress line's first word (e.g. the method being trained).
    shown: record fields printed in the progress line (all are written).
    on_log: `on_log(step, state, host_window) -> dict` of extra record fields (JSON values).
    until: stop (and checkpoint) at the first logging step where `until(state)` holds; a resumed
      run whose checkpoint already meets it returns at once.
    log: progress sink.

  Raises:
    TrainingDiverged: a NaN/Inf metric; the last checkpoint saved is the last good one.
    CheckpointMismatch: the workdir's checkpoint holds another model or optimiser.
  """
  mngr, shared = None, is_shared(state)
  # orbax saves a process-local state only on process 0 of a multi-process job: such a run
  # keeps no checkpoint (it restarts from its beginning).
  if workdir is not None and (shared or jax.process_count() == 1):
    mngr = manager(workdir, schedule.max_checkpoints)
    state = restore_latest(workdir, state, schedule.max_checkpoints)
  start = int(state.step)
  primary = distributed.is_primary() or not shared  # who writes the shared files and prints
  if workdir is not None and primary:
    # Steps after the checkpoint are redone (identically): their old lines would repeat. A line
    # torn by a kill is dropped too.
    record.trim_jsonl(os.path.join(workdir, 'metrics.jsonl'), lambda r: r.get('step', 0) <= start)
  if shared:
    distributed.barrier('loop.run: metrics trimmed')
  records = read_records(workdir)
  log = log if primary else (lambda line: None)
  if start:
    log(f'resumed from {workdir}/checkpoints at step {start}')
    if until is not None and until(state):
      return state, records
  board = progress.Scalars(
    None if workdir is None or not primary else os.path.join(workdir, 'tensorboard')
  )
  try:
    state = _steps(state, train_step, batches, schedule, workdir, mngr, board, records,
                   label=label, shown=shown, on_log=on_log, until=until, log=log,
                   written=workdir is not None and primary)  # fmt: skip
  finally:
    board.close()
    if mngr is not None:  # commit any checkpoint still being written, also when interrupted
      mngr.wait_until_finished()
  return state, records


def _steps(state, train_step, batches, schedule, workdir, mngr, board, records, **kw):
  """The loop of `run` (same arguments); appends to `records`."""
  import orbax.checkpoint as ocp

  step = start = int(state.step)
  bar = progress.Progress(kw['label'], schedule.steps, start=start, every=0.0, log=kw['log'])
  window, t_last, last = [], time.time(), False
  path = os.path.join(workdir, 'metrics.jsonl') if kw['written'] else None
  while step < schedule.steps and not last:
    epoch, skip = divmod(step, schedule.per_epoch)
    for i, batch in enumerate(batches(epoch)):
      if i < skip:
        continue
      state, metrics = train_step(state, batch)
      step += 1
      if step == start + 1:  # the rate and ETA leave out compilation (the first step)
        jax.block_until_ready(metrics)
        bar.mark(step)
      window.append(metrics)
      last = step == schedule.steps
      ckpt = step % schedule.checkpoint_every == 0
      if step % schedule.log_every == 0 or last or ckpt:
        mean, host = _window_mean(window, step, workdir, mngr)
        window = []
        now = time.time()
        rec = {'step': step, 'time': now - t_last, **mean}
        if kw['on_log'] is not None:
          rec.update(kw['on_log'](step, state, host))
          rec['on_log_time'] = time.time() - now  # kept out of 'time' (training only)
        t_last = time.time()
        records.append(rec)
        if path is not None:
          with open(path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        board.write(step, {k: v for k, v in rec.items() if isinstance(v, int | float)})
        bar.update(step, _shown(rec, kw['shown']), force=True)
        until = kw['until']
        if until is not None and step % schedule.log_every == 0 and until(state):
          last = True
      if mngr is not None and (ckpt or last):
        mngr.save(step, args=ocp.args.StandardSave(state._asdict()))
      if last:
        break
  return state
