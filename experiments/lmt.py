r"""Lipschitz-margin training, certification and attack, from flags.

  python experiments/lmt.py --flagfile=experiments/configs/lmt_digits.flags \
      --workdir=runs/lmt_digits

Trains the LMT model and its plain baseline, certifies both and attacks them with PGD. One
flag per field of `tsuzuku_jax.lmt.experiment.Config` (`--helpshort`): flags -> Config ->
`run(config, workdir)`.
"""

import common

from tsuzuku_jax.lmt import experiment

main = common.main(experiment)

if __name__ == '__main__':
  common.run(main)
