r"""Normalized flatness over a model zoo, and PAC-Bayes bounds, from flags.

  python experiments/flatness.py --flagfile=experiments/configs/flatness_digits.flags \
      --workdir=runs/flatness_digits

Flags -> `tsuzuku_jax.flatness.experiment.Config` -> `run(config, workdir)` (what it does and
writes: that module's docstring). A finished zoo model's model.json is never recomputed: an
interrupted run resumes where it stopped. WORKDIR/run.json records the run: a later invocation
resumes only the same flags and data (see experiments/common.py).
"""

import common
from absl import flags, logging

from tsuzuku_jax.flatness import experiment

D = experiment.Config()  # the defaults
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('dataset', D.dataset, 'digits | mnist | cifar10 | npz:PATH.')
flags.DEFINE_bool('zoo', D.zoo, 'Train and measure the model zoo.')
flags.DEFINE_list('widths', list(map(str, D.widths)), 'Zoo: hidden widths.')
flags.DEFINE_list('depths', list(map(str, D.depths)), 'Zoo: hidden layers.')
flags.DEFINE_list('learning_rates', list(map(str, D.learning_rates)), 'Zoo: SGD learning rates.')
flags.DEFINE_list('batch_sizes', list(map(str, D.batch_sizes)), 'Zoo: batch sizes.')
flags.DEFINE_list('weight_decays', list(map(str, D.weight_decays)), 'Zoo: weight decays.')
flags.DEFINE_list(
  'label_noises', list(map(str, D.label_noises)), 'Zoo: fraction of relabelled examples.'
)
flags.DEFINE_list('seeds', list(map(str, D.seeds)), 'Zoo: seeds (one zoo each).')
flags.DEFINE_float('loss_criterion', D.loss_criterion, 'Stop at this training cross-entropy.')
flags.DEFINE_integer('check_every', D.check_every, 'Steps between criterion checks.')
flags.DEFINE_integer('max_steps', D.max_steps, 'Give up (not converged) after this.')
flags.DEFINE_integer('probes', D.probes, 'Hutchinson probes per trace.')
flags.DEFINE_integer('lanczos_iters', D.lanczos_iters, 'Lanczos steps for the top eigenvalue.')
flags.DEFINE_float('lam', D.lam, 'lambda of the sigma-optimised measure.')
flags.DEFINE_integer(
  'sharpness_samples', D.sharpness_samples, 'Noise draws per sharpness bisection.'
)
flags.DEFINE_integer('sharpness_iters', D.sharpness_iters, 'Bisection steps on log sigma.')
flags.DEFINE_float('rescale', D.rescale, 'Neuron-wise factors are in [1/r, r].')
flags.DEFINE_bool('bound', D.bound, 'Compute the PAC-Bayes bounds.')
flags.DEFINE_list('bound_hidden', list(map(str, D.bound_hidden)), 'Bound model: MLP hidden widths.')
flags.DEFINE_float('prior_fraction', D.prior_fraction, 'Training data used to fit the prior.')
flags.DEFINE_integer('prior_steps', D.prior_steps, 'SGD steps fitting the prior mean.')
flags.DEFINE_integer('posterior_steps', D.posterior_steps, 'Adam steps on the posterior.')
flags.DEFINE_float('posterior_lr', D.posterior_lr, 'Posterior learning rate.')
flags.DEFINE_list('prior_sigmas', list(map(str, D.prior_sigmas)), 'Prior scales (union).')
flags.DEFINE_integer('mc_samples', D.mc_samples, 'Sampled networks in the certificate.')
flags.DEFINE_float('delta', D.delta, 'PAC-Bayes confidence (over all prior scales).')
flags.DEFINE_float('delta_mc', D.delta_mc, 'Sampling confidence (over all prior scales).')
flags.DEFINE_integer('seed', D.seed, 'Bound: random seed.')

_LISTS = {'widths': int, 'depths': int, 'learning_rates': float, 'batch_sizes': int,
          'weight_decays': float, 'label_noises': float, 'seeds': int, 'bound_hidden': int,
          'prior_sigmas': float}  # fmt: skip


def main(argv):
  del argv
  config = common.config_from_flags(
    experiment.Config, {n: (k, f'a list of {k.__name__}s') for n, k in _LISTS.items()}
  )
  logging.set_verbosity(logging.WARNING)
  experiment.run(config, _WORKDIR.value, overwrite=common.OVERWRITE.value, cli=True)


if __name__ == '__main__':
  common.run(main)
