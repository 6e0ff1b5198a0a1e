"""Fourier-basis directions and Fourier heat maps (Tsuzuku & Sato, CVPR 2019; Yin et al., 2019).

The direction of frequency (u, v) on an H x W grid is the unit-L2 real image

    b_uv = Re[(1 + i) F_uv + (1 - i) F_{-u,-v}] / norm = (cos t - sin t) / sqrt(H W),
    t(m, n) = 2 pi (u m / H + v n / W),

the phase-pi/4 construction of the paper. (u, v) and (-u, -v) give different, orthogonal
directions (cos - sin and cos + sin), so the H * W directions over the whole grid form an
orthonormal basis of R^{H x W} (a discrete Hartley basis). Frequencies index the unshifted
`fft2` grid: u in 0..H-1, v in 0..W-1 (`jnp.fft.fftshift` centres them for display).

Images are NHWC in [0, 1] pixel units; norms are in those units. A perturbation of L2 norm eps
on C channels puts eps * b_uv * s_c / sqrt(C) on channel c, for a sign pattern s in {+1, -1}^C.

Modules: `tsuzuku_jax.fourier.directions` (the basis, directions and perturbations),
`.sensitivity` (Fourier heat maps) and `.search` (the black-box universal Fourier attack and its
evaluation). The paper-free baselines the attack is
compared with, `random_perturbations` and `whitebox_universal`, are in `tsuzuku_jax.attacks`.
"""

from tsuzuku_jax.fourier.directions import (
  all_frequencies,
  basis,
  check_frequency,
  linf_of_unit_direction,
  perturbation,
)
from tsuzuku_jax.fourier.search import (
  AttackResult,
  QueryFn,
  calibrate_eps,
  candidate_perturbation,
  fooling_rate,
  fourier_attack,
  shifted_fooling_rates,
  sign_patterns,
)
from tsuzuku_jax.fourier.sensitivity import MODES, LogitsFn, heat_map, image_signs

__all__ = [
  'MODES',
  'AttackResult',
  'LogitsFn',
  'QueryFn',
  'all_frequencies',
  'basis',
  'calibrate_eps',
  'candidate_perturbation',
  'check_frequency',
  'fooling_rate',
  'fourier_attack',
  'heat_map',
  'image_signs',
  'linf_of_unit_direction',
  'perturbation',
  'shifted_fooling_rates',
  'sign_patterns',
]
