r"""Fourier heat map and black-box universal Fourier attack on a trained classifier, from flags.

  python experiments/fourier.py --flagfile=experiments/configs/fourier_digits.flags \
      --workdir=runs/fourier_digits

Trains a CNN, maps its sensitivity to Fourier directions and searches, with label queries
only, for a universal Fourier perturbation, beside random and white-box baselines. One flag
per field of `tsuzuku_jax.fourier.experiment.Config` (`--helpshort`): flags -> Config ->
`run(config, workdir)`.
"""

import common

from tsuzuku_jax.fourier import experiment

main = common.main(experiment)

if __name__ == '__main__':
  common.run(main)
