r"""Data-parallel training with compressed gradient exchange (VGC and baselines), from flags.

  python experiments/vgc.py --flagfile=experiments/configs/vgc_digits.flags --workdir=runs/vgc

One flag per field of `tsuzuku_jax.vgc.experiment.Config` (`--helpshort`), and --distributed;
flags -> Config -> `run(config, workdir)`. Trains each method and seed on the same data
(resuming inside a run), then compares accuracy, bytes sent and the modelled speed-up.
"""

import common
from absl import flags

from tsuzuku_jax.vgc import experiment

_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')


def _initialize() -> None:
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()


main = common.main(experiment, setup=_initialize)

if __name__ == '__main__':
  common.run(main)
