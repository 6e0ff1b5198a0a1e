r"""Data-parallel training with compressed gradient exchange (VGC and baselines), from flags.

  python experiments/vgc.py --flagfile=experiments/configs/vgc_digits.flags --workdir=runs/vgc

One flag per field of `tsuzuku_jax.vgc.experiment.Config` (`--helpshort`); flags -> Config ->
`run(config, workdir)`. Trains each method and seed on the same data (resuming inside a run),
then compares accuracy, bytes sent and the modelled speed-up. One worker per device, across
all the processes of a multi-process job (see experiments/common.py).
"""

import common

from tsuzuku_jax.vgc import experiment

main = common.main(experiment)

if __name__ == '__main__':
  common.run(main)
