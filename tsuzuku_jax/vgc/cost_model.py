"""Communication cost model of compressed data-parallel training, and the per-worker timings
that feed it.

Alpha-beta model, per worker, no overlap; n workers, bandwidth B bytes/s per link, latency a
seconds per message:
  ring all-reduce of D bytes:                 2 (n-1) a + 2 (n-1)/n * D / B
  ring all-gather of K bytes from each worker:  (n-1) a +   (n-1)   * K / B
So an all-gather of compressed messages beats the dense ring all-reduce only when the byte
compression ratio R = D / K exceeds n / 2 (bandwidth terms alone). `measure_worker_times`
measures one worker's compute, variance and compression times on its local batch (the
launcher's speed-up tables use them).
"""

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.vgc import variance

GBIT = 1e9 / 8  # bytes/s in one Gbit/s


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
  """Seconds for a ring all-reduce of `nbytes` per worker (bandwidth in bytes/s)."""
  if n <= 1:
    return 0.0
  return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def ring_allgather_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
  """Seconds for a ring all-gather where each worker contributes `nbytes`."""
  if n <= 1:
    return 0.0
  return (n - 1) * latency + (n - 1) * nbytes / bandwidth


@dataclasses.dataclass(frozen=True)
class StepModel:
  """Inputs of the step-time model; times in seconds, bytes per worker per step."""

  dense_bytes: float  # D: gradient bytes (4 per float32 element).
  sparse_bytes: float  # K: compressed message bytes.
  workers: int
  t_compute: float  # forward + backward of the plain step.
  t_compress: float = 0.0  # local compression (and decode) time.
  t_variance: float = 0.0  # extra time of the variance estimate.
  latency: float = 25e-6


def step_times(m: StepModel, bandwidth: float) -> dict:
  """Dense and compressed step times (no overlap) and the speedup at one bandwidth."""
  t_ar = ring_allreduce_time(m.dense_bytes, m.workers, bandwidth, m.latency)
  t_ag = ring_allgather_time(m.sparse_bytes, m.workers, bandwidth, m.latency)
  dense = m.t_compute + t_ar
  comp = m.t_compute + m.t_variance + m.t_compress + t_ag
  return {
    'bandwidth_gbit': bandwidth / GBIT,
    't_allreduce': t_ar,
    't_allgather': t_ag,
    't_dense_step': dense,
    't_compressed_step': comp,
    'speedup': dense / comp,
    'comm_speedup': t_ar / t_ag if t_ag > 0 else float('inf'),
  }


def break_even_bandwidth(m: StepModel) -> tuple[float, str]:
  """Where the compressed step becomes faster: `(B*, side)`, B* in bytes/s.

  Solves t_variance + t_compress + T_allgather(B) = T_allreduce(B) for B. `side` says where
  the compressed step is faster: 'below' B*, 'above' B* (only when the all-gather moves more
  bytes but saves latency), 'always' or 'never' (then B* is inf or 0).
  """
  n = m.workers
  saved_bytes = 2 * (n - 1) / n * m.dense_bytes - (n - 1) * m.sparse_bytes
  overhead = m.t_variance + m.t_compress - (n - 1) * m.latency  # all-gather has n-1 fewer hops
  # Compressed is faster iff overhead < saved_bytes / B.
  if saved_bytes > 0:
    return (saved_bytes / overhead, 'below') if overhead > 0 else (float('inf'), 'always')
  if overhead >= 0:
    return 0.0, 'never'
  return saved_bytes / overhead, 'above'


def speedup_table(m: StepModel, gbits: Sequence[float] = (1, 10, 100)) -> dict:
  """Rows of `step_times` at each bandwidth (Gbit/s) plus the break-even bandwidth."""
  b_star, side = break_even_bandwidth(m)
  return {
    'inputs': dataclasses.asdict(m),
    'byte_ratio': m.dense_bytes / m.sparse_bytes,
    'allgather_wins_bytes': m.dense_bytes / m.sparse_bytes > m.workers / 2,
    'rows': [step_times(m, g * GBIT) for g in gbits],
    'break_even_gbit': b_star / GBIT,
    'compressed_faster': side,  # relative to break_even_gbit
  }


def median_seconds(fn: Callable, *args, repeats: int) -> float:
  """Median seconds of `fn(*args)` over `repeats` calls, after one (compiling) call."""
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_worker_times(loss_fn: Callable, params, batch: dict, config, repeats=5):
  """One worker's median times (seconds) on `batch` (its local batch), for the cost model.

  Returns:
    {'t_compute': forward + backward, 't_variance': the variance estimator's time minus
    t_compute (0 for methods without it), 't_compress': `compressor.update` (from a fresh
    state; the message shapes are static, so the time hardly depends on what passes). The
    decode and scatter-add of the n received messages is not included.
  """
  comp = config.compressor()
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  t_compute = median_seconds(grad_fn, params, batch, repeats=repeats)
  grads = grad_fn(params, batch)[1]
  s = jax.tree.map(jnp.square, grads)
  t_variance = 0.0
  if comp.needs_variance:
    est = variance.estimator(config.estimator, config.microbatches)
    est_fn = jax.jit(lambda p, b: est(loss_fn, p, b))
    t_variance = max(median_seconds(est_fn, params, batch, repeats=repeats) - t_compute, 0.0)
  update = jax.jit(comp.update)
  state = comp.init(params)
  t_compress = median_seconds(
    update, grads, state, s if comp.needs_variance else None, repeats=repeats
  )
  return {'t_compute': t_compute, 't_variance': t_variance, 't_compress': t_compress}
