"""The compressed all-reduce (inside `shard_map` or a named `vmap`), and a communication cost model.

`mean_of_messages(messages, like, axis_name)` averages one message per worker over the named
axis: dense leaves with `psum`, `SparseMessage` leaves by `all_gather` of the packed words (and
raw values, and the per-tensor scales), decoding and scatter-adding every worker's elements.
The same function runs under `jax.shard_map` over a mesh axis (one worker per device) and
under `jax.vmap(..., axis_name=...)` (workers simulated on one device); the two give the same
result (tests).

Cost model (alpha-beta, per worker, no overlap; n workers, bandwidth B bytes/s per link,
latency a seconds per message):
  ring all-reduce of D bytes:                 2 (n-1) a + 2 (n-1)/n * D / B
  ring all-gather of K bytes from each worker:  (n-1) a +   (n-1)   * K / B
So an all-gather of compressed messages beats the dense ring all-reduce only when the byte
compression ratio R = D / K exceeds n / 2 (bandwidth terms alone).
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tsuzuku_jax.compression import SparseMessage, decode_values, unpack_index

GBIT = 1e9 / 8  # bytes/s in one Gbit/s


def _is_message(x) -> bool:
  return isinstance(x, SparseMessage)


def check_axis(mesh: jax.sharding.Mesh, axis_name: str) -> None:
  """Raises ValueError naming the axis when `mesh` has no axis `axis_name`."""
  if axis_name not in mesh.axis_names:
    raise ValueError(f'mesh has no axis {axis_name!r} (axes: {tuple(mesh.axis_names)})')


def mean_of_messages(messages, like, axis_name: str):
  """Mean over workers of the decoded messages, as a pytree shaped like `like`.

  Must be called inside `shard_map` or `vmap` with `axis_name` bound.

  Args:
    messages: pytree with `like`'s structure: a `SparseMessage` or a dense array per leaf.
    like: pytree of arrays (or shape structs) giving each leaf's shape.
    axis_name: the workers' axis.

  Returns:
    The mean gradient, float32, identical on every worker.
  """
  n = jax.lax.axis_size(axis_name)

  def one(msg, ref):
    if not _is_message(msg):
      return jax.lax.psum(msg.astype(jnp.float32), axis_name) / n
    words = jax.lax.all_gather(msg.words, axis_name)  # (n, capacity)
    if msg.values.size:
      vals = jax.lax.all_gather(msg.values, axis_name)
    else:
      scales = jax.lax.all_gather(msg.scale, axis_name)  # (n,)
      vals = decode_values(words, scales[:, None])
    index = unpack_index(words)
    # One scatter per worker, in worker order: indices are unique within a message, so the sum
    # has a fixed order and every device computes bit-identical means (a single scatter of all
    # n messages would add duplicate indices with GPU atomics, in no fixed order).
    add = lambda w, t: t.at[index[w]].add(vals[w], mode='drop')
    total = jax.lax.fori_loop(0, n, add, jnp.zeros((ref.size,), jnp.float32))
    return (total / n).reshape(ref.shape)

  return jax.tree.map(one, messages, like, is_leaf=_is_message)


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
