r"""Fourier heat map and black-box universal Fourier attack on a trained classifier, from flags.

  python experiments/fourier.py --flagfile=experiments/configs/fourier_digits.flags \
      --workdir=runs/fourier_digits

Flags -> `tsuzuku_jax.fourier.experiment.Config` -> `run(config, workdir)` (what it does and
writes: that module's docstring). WORKDIR/run.json records the run: a later invocation resumes
only the same flags and data (see experiments/common.py).
"""

import common
from absl import flags, logging

from tsuzuku_jax.fourier import experiment

D = experiment.Config()  # the defaults
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('dataset', D.dataset, 'digits | mnist | cifar10 | npz:PATH.')
flags.DEFINE_list('channels', list(map(str, D.channels)), 'CNN channels per stage.')
flags.DEFINE_integer('dense', D.dense, 'CNN dense width.')
flags.DEFINE_integer('steps', D.steps, 'Training steps.')
flags.DEFINE_integer('batch_size', D.batch_size, 'Training batch size.')
flags.DEFINE_float('learning_rate', D.learning_rate, 'Adam learning rate.')
flags.DEFINE_list(
  'eps',
  list(map(str, D.eps)),
  'L2 norms (pixels in [0, 1]) of the perturbations; "auto": the norm at which the random '
  "baseline's directions fool --random_target of the held-out images (bisection).",
)
flags.DEFINE_list(
  'linf_equivalent',
  list(D.linf_equivalent),
  'Linf budgets such as 4/255: each adds the L2 norm eps * sqrt(H W C / 2), that of a Fourier '
  'direction whose largest pixel change is eps (most frequencies; the others change no pixel by '
  'more than eps at that norm).',
)
flags.DEFINE_float('random_target', D.random_target, 'Random fooling rate for "auto".')
flags.DEFINE_integer('heat_map_images', D.heat_map_images, 'Test images in the heat map (0: all).')
flags.DEFINE_integer(
  'heldout_images', D.heldout_images, 'Held-out test images after the search set (0: all the rest).'
)
flags.DEFINE_integer(
  'shift_stride', D.shift_stride, 'Evaluate circular shifts on this grid stride (1: every shift).'
)
flags.DEFINE_integer('search_images', D.search_images, 'Test images the search may query.')
flags.DEFINE_enum('search', D.search, list(experiment.SEARCHES), 'Search mode.')
flags.DEFINE_integer('first_images', D.first_images, 'Halving: images in the first round.')
flags.DEFINE_integer('eta', D.eta, 'Halving: keep 1/eta per round.')
flags.DEFINE_integer('random_trials', D.random_trials, 'Random directions per norm.')
flags.DEFINE_integer('uap_steps', D.uap_steps, 'White-box universal perturbation steps.')
flags.DEFINE_integer('seed', D.seed, 'Random seed.')


def _norm(text: str) -> float | str:
  return 'auto' if text == 'auto' else float(text)


def main(argv):
  del argv
  lists = {'channels': (int, 'positive integers'), 'eps': (_norm, 'numbers or "auto"'),
           'linf_equivalent': (str, '')}  # fmt: skip
  config = common.config_from_flags(experiment.Config, lists)
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  experiment.run(config, _WORKDIR.value, overwrite=common.OVERWRITE.value, cli=True)


if __name__ == '__main__':
  common.run(main)
