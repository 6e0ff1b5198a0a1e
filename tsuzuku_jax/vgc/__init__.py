"""Variance-based gradient compression (Tsuzuku, Imachi & Akiba, ICLR 2018 workshop) for
data-parallel training.

`compression`: VGC and the baselines (Strom, hybrid, top-k, dense) with error feedback, 4-bit
code + index words; `variance`: estimators of the minibatch-mean gradient's variance;
`allreduce`: the compressed mean over a named axis (`shard_map` or a named `vmap`);
`data_parallel`: compressed data-parallel SGD; `cost_model`: ring all-reduce vs all-gather
times and the per-worker timings that feed them; `transforms`: the same as optax
transformations, `optax.chain(vgc.compress('vgc', alpha=2.0, capacity=0.05),
vgc.mean_over('data'), optax.sgd(0.1))`, run per worker under `shard_map` or a named `vmap`.
"""

from tsuzuku_jax.vgc import allreduce, compression, cost_model, data_parallel, transforms, variance
from tsuzuku_jax.vgc.transforms import (
  CompressTxState,
  compress,
  compression_stats,
  mean_over,
  per_worker,
  worker_spec,
)

__all__ = [
  'CompressTxState',
  'allreduce',
  'compress',
  'compression',
  'compression_stats',
  'cost_model',
  'data_parallel',
  'mean_over',
  'per_worker',
  'transforms',
  'variance',
  'worker_spec',
]
