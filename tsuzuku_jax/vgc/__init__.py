"""Variance-based gradient compression (Tsuzuku, Imachi & Akiba, ICLR 2018 workshop) for
data-parallel training.

`compression`: VGC and the baselines (Strom, hybrid, top-k, dense) with error feedback, 4-bit
code + index words; `variance`: estimators of the minibatch-mean gradient's variance;
`allreduce`: the compressed mean over a named axis (`shard_map` or a named `vmap`);
`data_parallel`: compressed data-parallel SGD; `cost_model`: ring all-reduce vs all-gather
times and the per-worker timings that feed them.
"""

from tsuzuku_jax.vgc import allreduce, compression, cost_model, data_parallel, variance

__all__ = ['allreduce', 'compression', 'cost_model', 'data_parallel', 'variance']
