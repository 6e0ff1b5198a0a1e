"""Compression as optax transformations: a compressor and the compressed mean over a named axis.

Inside `jax.shard_map` over a mesh axis (one worker per device), or under
`jax.vmap(..., axis_name=...)` (workers simulated on one device), every worker runs

  tx = optax.chain(vgc.compress('vgc', alpha=2.0, capacity=0.05), vgc.mean_over('data'),
                   optax.sgd(0.1, momentum=0.9))
  updates, opt_state = tx.update(grads, opt_state, params, variance=s)

`compress` turns the worker's gradient into its messages (error feedback in its state, the
variance as the keyword extra argument `variance`), `mean_over` averages every worker's
messages (`allreduce.mean_of_messages`; the decoded mean is the same on every worker), and what
follows sees a plain gradient. The whole chain's state is per worker: build it with
`per_worker(tx.init(params), n)` (a leading axis of n workers) and give it to `shard_map` as
`P('data')` (`worker_spec`), or to `vmap` as axis 0; the optimiser's state after the mean is the
same on every worker. `compression_stats(opt_state)` reads the last step's counts and bytes.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from tsuzuku_jax.vgc import allreduce, compression


class CompressTxState(NamedTuple):
  """The state of `compress`: the compressor's (residual, variance, count) and the last step's
  statistics (sent, candidates, overflow, underflow, elements and bytes, this worker)."""

  inner: compression.CompressState
  stats: dict


def compress(method: str = 'vgc', **kwargs) -> optax.GradientTransformationExtraArgs:
  """`compression.make(method, **kwargs)` as an optax transformation: updates in, messages out.

  `update(grads, state, params=None, *, variance=None)`; `variance` (the minibatch-mean
  gradient's variance, e.g. from `variance.cheap`) is required by 'vgc' and 'hybrid'.

  Raises:
    ValueError: an unknown method or a parameter out of range (at construction).
  """
  comp = compression.make(method, **kwargs)

  def init(params):
    state = comp.init(params)
    like = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    var = like if comp.needs_variance else None
    shapes = jax.eval_shape(lambda: comp.update(like, state, var)[2])
    return CompressTxState(state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

  def update(updates, state: CompressTxState, params=None, *, variance=None):
    del params
    messages, inner, stats = comp.update(updates, state.inner, variance)
    return messages, CompressTxState(inner, stats)

  return optax.GradientTransformationExtraArgs(init, update)


def mean_over(axis_name: str) -> optax.GradientTransformation:
  """The mean over the named axis of every worker's messages (dense leaves by `psum`, sparse
  ones by all-gather and decode); needs `params` (the messages' shapes) and the axis bound."""

  def update(messages, state, params=None):
    if params is None:
      raise ValueError('mean_over needs params (the shapes to decode the messages into)')
    return allreduce.mean_of_messages(messages, params, axis_name), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def compression_stats(opt_state: Any) -> dict:
  """The last step's statistics of the (first) `compress` inside an optax state."""
  found = [
    s.stats
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, CompressTxState))
    if isinstance(s, CompressTxState)
  ]
  if not found:
    raise ValueError('opt_state holds no compress state (is vgc.compress in the chain?)')
  return found[0]


def per_worker(tree: Any, workers: int) -> Any:
  """`tree` with a leading axis of `workers` copies: the per-worker state of a chain."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (workers, *jnp.shape(a))), tree)


def worker_spec(axis_name: str = 'data') -> P:
  """The `shard_map` spec of per-worker state (one slice per device along `axis_name`); inside,
  each worker sees its slice with a leading axis of 1."""
  return P(axis_name)
