r"""Normalized flatness over a model zoo, and PAC-Bayes bounds, from flags.

  python experiments/flatness.py --flagfile=experiments/configs/flatness_digits.flags \
      --workdir=runs/flatness_digits

One flag per field of `tsuzuku_jax.flatness.experiment.Config` (`--helpshort`): flags ->
Config -> `run(config, workdir)`, which trains and measures the zoo (an interrupted zoo resumes
at its first unfinished model), ranks the measures against the generalization gap and
certifies the PAC-Bayes bounds.
"""

import common

from tsuzuku_jax.flatness import experiment

main = common.main(experiment)

if __name__ == '__main__':
  common.run(main)
