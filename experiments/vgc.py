r"""Data-parallel training with compressed gradient exchange (VGC and baselines), from flags.

  python experiments/vgc.py --flagfile=experiments/configs/vgc_digits.flags --workdir=runs/vgc

Flags -> `tsuzuku_jax.vgc.experiment.Config` -> `run(config, workdir)` (what it trains and
writes: that module's docstring). WORKDIR/run.json records the run: a later invocation resumes
only the same flags, data and number of workers (see experiments/common.py).
"""

import common
from absl import app, flags

from tsuzuku_jax.vgc import compression, experiment

D = experiment.Config()  # the defaults
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('dataset', D.dataset, 'digits | mnist | cifar10 | npz:PATH.')
flags.DEFINE_enum('model', D.model, ['mlp', 'cnn'], 'Architecture (no batch norm).')
flags.DEFINE_list('hidden', list(map(str, D.hidden)), 'MLP hidden widths.')
flags.DEFINE_list('channels', list(map(str, D.channels)), 'CNN channels per stage.')
flags.DEFINE_integer('dense', D.dense, 'CNN dense width.')
flags.DEFINE_list('methods', list(D.methods), f'Any of {compression.METHODS}.')
flags.DEFINE_list('seeds', list(map(str, D.seeds)), 'Seeds (model init and data order).')
flags.DEFINE_float('alpha', D.alpha, 'vgc/hybrid: send when r^2 > alpha v.')
flags.DEFINE_float('zeta', D.zeta, 'vgc/hybrid: decay of v for unsent elements.')
flags.DEFINE_float('tau', D.tau, 'strom/hybrid: threshold on |r|.')
flags.DEFINE_float('density', D.density, 'topk: fraction sent per tensor.')
flags.DEFINE_float('capacity', D.capacity, 'vgc/strom/hybrid: slots per tensor (fraction).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'default', ['default', 'true', 'false'], '4-bit codes.')
flags.DEFINE_enum('estimator', D.estimator, ['cheap', 'microbatch', 'per_example'], '')
flags.DEFINE_integer('microbatches', D.microbatches, 'Micro-batches of the microbatch estimator.')
flags.DEFINE_integer('workers', D.workers, 'Workers (0: one per device).')
flags.DEFINE_bool('simulate', D.simulate, 'Run the workers as a vmap on one device.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
flags.DEFINE_integer('steps', D.steps, 'Training steps.')
flags.DEFINE_integer('batch_size', D.batch_size, 'Global batch size.')
flags.DEFINE_float('learning_rate', D.learning_rate, 'Peak learning rate (SGD).')
flags.DEFINE_enum('schedule', D.schedule, ['cosine', 'constant'], 'LR schedule.')
flags.DEFINE_float('momentum', D.momentum, 'Heavy-ball momentum.')
flags.DEFINE_enum('momentum_on', D.momentum_on, ['update', 'worker'], 'Where.')
flags.DEFINE_float('weight_decay', D.weight_decay, 'Weight decay.')
flags.DEFINE_enum('weight_decay_on', D.weight_decay_on, ['update', 'gradient'], 'Where.')
flags.DEFINE_integer('eval_every', D.eval_every, 'Steps between test evaluations.')
flags.DEFINE_integer('checkpoint_every', D.checkpoint_every, 'Steps between checkpoints (resume).')
flags.DEFINE_float('reference_params', D.reference_params, 'Model size of the speedup model.')
flags.DEFINE_float('reference_t_compute_ms', D.reference_t_compute_ms, 'ASSUMED step time there.')
flags.DEFINE_float('reference_memory_gbs', D.reference_memory_gbs, 'ASSUMED memory bandwidth.')
flags.DEFINE_float(
  'reference_compress_over_floor', D.reference_compress_over_floor, 'ASSUMED compress/floor.'
)


def main(argv):
  del argv
  for name in ('hidden', 'channels', 'seeds'):
    value = getattr(flags.FLAGS, name)
    if not value or not all(v.isdigit() for v in value):
      raise app.UsageError(f'--{name} must be non-negative integers, got {value}')
  quantize = {'default': None, 'true': True, 'false': False}[_QUANTIZE.value]
  lists = {n: (int, 'non-negative integers') for n in ('hidden', 'channels', 'seeds')}
  config = common.config_from_flags(
    experiment.Config, lists | {'methods': (str, '')}, quantize=quantize
  )
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  experiment.run(config, _WORKDIR.value, overwrite=common.OVERWRITE.value, cli=True)


if __name__ == '__main__':
  common.run(main)
