"""Progress lines a researcher can trust, and the TensorBoard record of a run's metrics.

`Progress` prints `label done/total rate ETA` for a long phase (training, certification, an
attack, a heat map, a search, the flatness measures). The clock starts when the first unit is
done: that unit paid for compilation, so neither the rate nor the ETA counts it. A line is
printed every `every` seconds (10 by default), and a last one when such a phase ends, so a
phase of many small units does not flood a notebook and a short phase prints nothing. In a
multi-process job only process 0 prints (by default).

`Scalars` writes metrics to TensorBoard event files with tensorboardX (no TensorFlow), so a run
can be watched live with `tensorboard --logdir WORKDIR`; nothing is written when `logdir` is
None, and a resumed run appends a new events file beside the old one (TensorBoard shows the
steps in order).
"""

import sys
import time
from collections.abc import Callable, Mapping

from tsuzuku_jax.workdir import print_flushed


def print_on_process_0(line: str) -> None:
  """`print_flushed` on process 0 of a multi-process job (and in a single process)."""
  jax = sys.modules.get('jax')  # not imported here: progress lines need no jax
  if jax is None or jax.process_index() == 0:
    print_flushed(line)


class Progress:
  """Progress of `total` units of one phase, with a rate and an ETA that leave out compilation.

  Call `update(done)` after each unit with the number done so far (units done before this
  process started, as on resume, may be passed as `start`).
  """

  def __init__(
    self,
    label: str,
    total: int,
    *,
    unit: str = 'steps',
    start: int = 0,
    every: float = 10.0,
    log: Callable[[str], None] = print_on_process_0,
    clock: Callable[[], float] = time.monotonic,
  ):
    if total < 0 or not 0 <= start <= max(total, 0):
      raise ValueError(f'{label}: need 0 <= start <= total, got start={start}, total={total}')
    self.label, self.total, self.unit, self.every = label, total, unit, every
    self.log, self.clock = log, clock
    self.warm: tuple[int, float] | None = None  # (units, time) when the first unit was done
    self.start, self.last_print, self.began = start, None, clock()

  def rate(self, done: int) -> float | None:
    """Units per second since the first unit (None until a second one is done)."""
    if self.warm is None or done <= self.warm[0]:
      return None
    return (done - self.warm[0]) / max(self.clock() - self.warm[1], 1e-9)

  def line(self, done: int, extra: str = '') -> str:
    rate = self.rate(done)
    if rate is None:
      speed = 'compiled' if done > self.start else 'starting'
    else:
      speed = f'{rate:.3g} {self.unit}/s ETA {_duration((self.total - done) / rate)}'
    return f'{self.label} {done}/{self.total}{extra} {speed}'

  def mark(self, done: int) -> float:
    """Records that `done` units are finished (the first one starts the clock); the time."""
    now = self.clock()
    if self.warm is None and done > self.start:
      self.warm = (done, now)
    return now

  def update(self, done: int, extra: str = '', *, force: bool = False) -> None:
    """Records that `done` units are finished; prints when `every` seconds have passed since
    the last line (or the start), at the end of a phase that printed before, or when `force`d:
    a phase shorter than `every` prints nothing."""
    now = self.mark(done)
    due = now - (self.began if self.last_print is None else self.last_print) >= self.every
    if force or due or (done >= self.total and self.last_print is not None):
      self.log(self.line(done, extra))
      self.last_print = now


def _duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m'."""
  s = int(round(seconds))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{s % 3600 // 60:02d}m'


class Scalars:
  """TensorBoard scalars under `logdir` (a no-op when `logdir` is None); use as a context."""

  def __init__(self, logdir: str | None):
    self.writer = None
    if logdir is not None:
      from tensorboardX import SummaryWriter  # lazy: only runs that record load it

      self.writer = SummaryWriter(logdir, flush_secs=10)

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = '') -> None:
    if self.writer is None:
      return
    for k, v in metrics.items():
      self.writer.add_scalar(f'{prefix}{k}', float(v), step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
