"""The phase-pi/4 Fourier basis: unit-L2 real directions of frequency (u, v) on an H x W grid,
and perturbations of a given norm built from them (see the `fourier` package docstring).
"""

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import checks


def _check_grid(hw) -> tuple[int, int]:
  h, w = (int(a) for a in hw)
  if h < 1 or w < 1:
    raise ValueError(f'grid must be positive (H, W), got {hw}')
  return h, w


def _check_inputs(images, clip, labels=None) -> None:
  """Images NHWC, finite and within the clip range when the function works in pixel space;
  labels (reference labels: any class index) one per image."""
  box = None if clip is None else tuple(clip)
  checks.check_images(images, 'images', pixel_range=box, hint=' (or pass clip=None)')
  if labels is not None:
    checks.check_labels(labels, None, 'labels', n=np.shape(images)[0])


def check_frequency(hw, freq) -> tuple[int, int]:
  """(u, v) as ints, or ValueError when it lies outside the 0..H-1 x 0..W-1 grid."""
  h, w = _check_grid(hw)
  u, v = (int(a) for a in freq)
  if not (0 <= u < h and 0 <= v < w):
    raise ValueError(
      f'frequency {tuple(freq)} is outside the {h}x{w} grid (0..{h - 1}, 0..{w - 1})'
    )
  return u, v


def basis(hw, freqs: jax.Array) -> jax.Array:
  """Unit-L2 real Fourier directions, built with `jnp.fft.ifft2`.

  Args:
    hw: (H, W).
    freqs: (K, 2) int frequencies (u, v) on the unshifted grid.

  Returns:
    (K, H, W) float32 directions b_uv (see the module docstring).
  """
  h, w = _check_grid(hw)
  freqs = jnp.asarray(freqs, jnp.int32).reshape(-1, 2)
  onehot = jax.nn.one_hot(freqs[:, 0], h)[:, :, None] * jax.nn.one_hot(freqs[:, 1], w)[:, None]
  # ifft2 of (1 + i) at (u, v) is (1 + i) e^{i t} / (H W); its real part is (cos t - sin t) / (HW).
  spatial = jnp.fft.ifft2((1 + 1j) * onehot.astype(jnp.complex64), axes=(1, 2))
  return (jnp.real(spatial) * np.sqrt(h * w)).astype(jnp.float32)


def all_frequencies(hw) -> jax.Array:
  """(H W, 2) int32 (u, v) over the whole grid, row-major."""
  h, w = _check_grid(hw)
  u, v = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  return jnp.stack([u.ravel(), v.ravel()], 1).astype(jnp.int32)


def linf_of_unit_direction(hw, freq) -> float:
  """L-infinity norm of the unit-L2 direction b_uv (exact, from its values on the grid)."""
  return float(jnp.max(jnp.abs(basis(hw, jnp.asarray([check_frequency(hw, freq)])))))


def perturbation(direction: jax.Array, signs: jax.Array, eps: float, norm: str = 'l2') -> jax.Array:
  """(H, W) direction x (C,) signs -> (H, W, C) perturbation of L2 norm eps, or Linf norm eps.

  With norm='linf' the same pattern is scaled so that its largest pixel change is eps.
  """
  if eps < 0:
    raise ValueError(f'the perturbation norm must be >= 0, got eps={eps}')
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  return _perturb(direction, signs, eps, norm)


def _perturb(direction, signs, eps, norm):
  signs = jnp.asarray(signs, jnp.float32)
  d = direction[..., None] * signs / jnp.sqrt(signs.size)
  if norm == 'linf':
    return d * (eps / jnp.max(jnp.abs(d)))
  return d * eps


def _perturbed(images, deltas, clip):
  """(K, B, H, W, C) deltas (or (K, 1, ...)) on (B, H, W, C) images, as one (K B)-image batch.

  The model sees one large batch instead of being vmapped over directions: models treat
  examples independently, and a vmapped model is slower (on the CPU, 2x for the small CNN).
  """
  z = images[None] + deltas
  if clip is not None:
    z = jnp.clip(z, *clip)
  return z.reshape(-1, *images.shape[1:])
