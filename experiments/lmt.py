r"""Lipschitz-margin training, certification and attack, from flags.

  python experiments/lmt.py --flagfile=experiments/configs/lmt_digits.flags \
      --workdir=runs/lmt_digits

Flags -> `tsuzuku_jax.lmt.experiment.Config` -> `run(config, workdir)` (what it does and
writes: that module's docstring). WORKDIR/run.json records the run: a later invocation resumes
only the same flags and data (see experiments/common.py).
"""

import common
from absl import flags, logging

from tsuzuku_jax.lmt import experiment

D = experiment.Config()  # the defaults
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, results).')
flags.DEFINE_string('dataset', D.dataset, 'digits | mnist | cifar10 | npz:PATH.')
flags.DEFINE_string('data_dir', None, 'tensorflow_datasets data_dir.')
flags.DEFINE_enum('model', D.model, list(experiment.MODELS), 'Architecture.')
flags.DEFINE_list('hidden', list(map(str, D.hidden)), 'MLP hidden widths.')
flags.DEFINE_list('channels', list(map(str, D.channels)), 'CNN channels per stage.')
flags.DEFINE_integer('dense', D.dense, 'CNN / LiResNet dense width.')
flags.DEFINE_bool('batch_norm', D.batch_norm, 'CNN: conv + batch norm.')
flags.DEFINE_integer('depth', D.depth, 'WRN depth; LiResNet: number of residual blocks.')
flags.DEFINE_integer('width', D.width, 'WRN width factor; LiResNet: channels.')
flags.DEFINE_enum('activation', D.activation, ['minmax', 'relu'], 'LiResNet activation.')
flags.DEFINE_float('dropout', D.dropout, 'WRN dropout.')
flags.DEFINE_bool('normalize', D.normalize, 'Per-channel standardisation inside the model.')
flags.DEFINE_integer('steps', D.steps, 'Training steps.')
flags.DEFINE_integer('batch_size', D.batch_size, 'Global batch size.')
flags.DEFINE_enum('optimizer', D.optimizer, ['adam', 'sgd'], 'Optimiser.')
flags.DEFINE_float('learning_rate', D.learning_rate, 'Peak learning rate.')
flags.DEFINE_enum('schedule', D.schedule, ['cosine', 'constant', 'step'], 'LR schedule.')
flags.DEFINE_integer('warmup_steps', D.warmup_steps, 'LR warm-up steps.')
flags.DEFINE_float('weight_decay', D.weight_decay, 'Weight decay.')
flags.DEFINE_float('c', D.c, 'LMT margin scale c (> 0).')
flags.DEFINE_integer('c_warmup_steps', D.c_warmup_steps, 'Steps over which c ramps up from 1e-5.')
flags.DEFINE_enum('form', D.form, ['global', 'pairwise'], 'Bound form used in training.')
flags.DEFINE_enum('variant', D.variant, ['lmt', 'gloro'], 'Margin loss variant.')
flags.DEFINE_bool('clip', D.clip, 'Clip the margin as the released LMT code did.')
flags.DEFINE_integer('seed', D.seed, 'Random seed.')
flags.DEFINE_list('eps', list(map(str, D.eps)), 'L2 radii to report.')
flags.DEFINE_bool('baseline', D.baseline, 'Also train the plain cross-entropy model.')
flags.DEFINE_integer('pgd_steps', D.pgd_steps, 'PGD steps.')
flags.DEFINE_integer('pgd_restarts', D.pgd_restarts, 'PGD random restarts.')
flags.DEFINE_integer('attack_examples', D.attack_examples, 'Test points attacked by PGD.')
flags.DEFINE_integer('log_every', D.log_every, 'Steps between progress lines.')
flags.DEFINE_integer('checkpoint_every', D.checkpoint_every, 'Steps between checkpoints.')


def main(argv):
  del argv
  ints, numbers = (int, 'positive integers'), (float, 'a comma-separated list of numbers')
  lists = {'hidden': ints, 'channels': ints, 'eps': numbers}
  config = common.config_from_flags(experiment.Config, lists)
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  experiment.run(config, _WORKDIR.value, overwrite=common.OVERWRITE.value, cli=True)


if __name__ == '__main__':
  common.run(main)
