"""White-box L2 PGD, robust accuracy, the empirical check of certified radii, and universal
perturbations (one for every image): random ones and a white-box projected gradient ascent.

`logits_fn` is any JAX function mapping images (B, H, W, C) to logits (B, K), with the model
parameters closed over by the caller, e.g. `lambda x: model.apply(params, x)`. It must treat
examples independently (e.g. batch norm in inference mode). `pgd_l2` is jitted with `logits_fn`
static: reuse the same function object across calls to avoid recompiling, or call these
functions from inside your own `jax.jit`, where `logits_fn` may close over traced parameters.

A certificate is checked as in LMT's `analyze_inequality.py`: run an attack restricted to the
certified ball of each certified point; any point of that ball classified differently is a
violation, so a sound certificate must give zero violations (the converse does not hold: PGD is
a lower bound on the adversarial risk).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsuzuku_jax import checks, distributed, progress

LogitsFn = Callable[[jax.Array], jax.Array]


def _per_example(v: jax.typing.ArrayLike, x: jax.Array) -> jax.Array:
  """Broadcasts a scalar or (B,) value to (B,) in x's dtype."""
  return jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape[:1])


def _expand(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes (B,) to (B, 1, ..., 1) so that it broadcasts against x."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def l2_norm(d: jax.Array) -> jax.Array:
  """Per-example L2 norm of (B, ...) -> (B,); the measure used by every check in this module."""
  return jnp.sqrt(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=-1))


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Carlini-Wagner margin max_{i != y} z_i - z_y, (B, K), (B,) -> (B,); >= 0 means wrong."""
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, jnp.finfo(logits.dtype).min, logits), axis=-1)
  return z_other - z_y


def is_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) bool: z_y > max_{i != y} z_i strictly (a tie between top logits counts as wrong)."""
  return margin(logits, y) < 0


# Relative slack between the radius PGD projects onto and the radius it guarantees. Different
# reduction orders (eager vs fused, CPU vs GPU) evaluate the same norm a few ulps apart; the
# slack keeps ||x_adv - x|| <= eps under any of them while weakening the attack negligibly.
_SLACK = 1e-5


def _project(x, x_adv, eps, clip_min, clip_max):
  """Projects onto {||x_adv - x||_2 <= eps} and the box, with the norm bound exact in float.

  Projects onto the ball of radius eps * (1 - _SLACK); if rounding (x + delta, clipping) leaves
  a norm above that, rescales once more, and where the norm still exceeds
  eps * (1 - _SLACK / 2) returns x itself, so the returned point always satisfies the bound.
  """
  tiny = jnp.finfo(x.dtype).tiny
  eps_in = eps * (1.0 - _SLACK)

  def clip(z):
    return z if clip_min is None and clip_max is None else jnp.clip(z, clip_min, clip_max)

  def shrink(z):
    delta = z - x
    norm = l2_norm(delta)
    factor = jnp.where(norm > eps_in, eps_in / jnp.maximum(norm, tiny), 1.0)
    return clip(x + delta * _expand(factor, x))

  # Clipping towards x (inside the box) cannot grow the norm in exact arithmetic; the second
  # shrink absorbs float rounding of x + delta.
  x_adv = shrink(shrink(x_adv))
  ok = l2_norm(x_adv - x) <= eps * (1.0 - _SLACK / 2)
  return jnp.where(_expand(ok, x), x_adv, x)


def _loss_and_margin(logits_fn, x, y, loss):
  """Returns (sum of per-example losses, ((B,) losses, (B,) margins))."""
  logits = logits_fn(x)
  m = margin(logits, y)
  if loss == 'margin':
    per_example = m
  elif loss == 'ce':
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  else:
    raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
  per_example = per_example.astype(x.dtype)
  return jnp.sum(per_example), (per_example, m)


def pgd_l2(
  logits_fn: LogitsFn,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  steps: int = 40,
  restarts: int = 4,
  step_size: jax.typing.ArrayLike | None = None,
  loss: str = 'margin',
  clip_min: float | None = 0.0,
  clip_max: float | None = 1.0,
) -> jax.Array:
  """Batched L2 projected gradient ascent with random restarts.

  Each restart starts uniformly at random in the L2 ball of radius eps around x (then clipped to
  the box), takes `steps` normalised-gradient steps on the loss, and projects back onto the ball
  and the box after each step. Per example the best point over all steps and restarts is kept:
  the first misclassified point found (argmax != y or a tie), otherwise the highest-loss point.

  Guarantee: ||x_adv - x||_2 <= eps per example exactly in x's dtype (iterates are kept within
  eps * (1 - 1e-5), so the bound holds for any summation order of the norm); x_adv lies in
  [clip_min, clip_max] when x does.

  Args:
    logits_fn: images (B, H, W, C) -> logits (B, K); static (hashable), parameters closed over.
    x: (B, H, W, C) float clean images (any (B, ...) shape works).
    y: (B,) int true labels.
    eps: scalar or (B,) non-negative, finite L2 radii; 0 leaves the example unperturbed.
    key: PRNG key (`jax.random.key`) for the random starts.
    steps: gradient steps per restart.
    restarts: number of random restarts, run sequentially.
    step_size: scalar or (B,) step length; default 2.5 * eps / steps per example.
    loss: 'margin' (max_{i != y} z_i - z_y, Carlini-Wagner style) or 'ce' (cross-entropy).
    clip_min: lower end of the pixel box, or None for no lower bound.
    clip_max: upper end of the pixel box, or None for no upper bound.

  Returns:
    x_adv: (B, H, W, C) adversarial images, same dtype as x.

  Raises:
    InvalidInput: (concrete inputs only) non-finite x or x outside [clip_min, clip_max],
      labels outside [0, K) or of another length, or a negative or non-finite eps.
  """
  checks.check_images(x, 'x', pixel_range=pixel_box(clip_min, clip_max), ndim=None)
  checks.check_labels_for(logits_fn, x, y, 'y')
  if not isinstance(eps, jax.core.Tracer):
    e = np.asarray(eps, np.float64)
    if not (np.all(np.isfinite(e)) and np.all(e >= 0)):
      raise checks.InvalidInput(f'eps must be finite and >= 0, got {e.min()}..{e.max()}')
  args = (key, steps, restarts, step_size, loss, clip_min, clip_max)
  return _pgd_l2(logits_fn, x, y, eps, *args)


def pixel_box(clip_min: float | None, clip_max: float | None) -> tuple[float, float]:
  """The (lo, hi) range clean images must lie in for PGD's box (None: unbounded)."""
  lo = -np.inf if clip_min is None else clip_min
  return lo, np.inf if clip_max is None else clip_max


@functools.partial(jax.jit, static_argnames=('logits_fn', 'steps', 'restarts', 'loss'))
def _pgd_l2(logits_fn, x, y, eps, key, steps, restarts, step_size, loss, clip_min, clip_max):
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  eps = _per_example(eps, x)
  alpha = 2.5 * eps / steps if step_size is None else _per_example(step_size, x)
  dim = x[0].size
  grad_fn = jax.grad(lambda z: _loss_and_margin(logits_fn, z, y, loss), has_aux=True)

  def update_best(best, z, losses, m):
    best_x, best_loss, found = best
    wrong = m >= 0
    take = ~found & (wrong | (losses > best_loss))
    best_x = jnp.where(_expand(take, x), z, best_x)
    return best_x, jnp.where(take, losses, best_loss), found | wrong

  def restart(r, best):
    k_dir, k_rad = jax.random.split(jax.random.fold_in(key, r))
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / _expand(jnp.maximum(l2_norm(direction), 1e-12), x)
    radius = eps * jax.random.uniform(k_rad, eps.shape, x.dtype) ** (1.0 / dim)
    z = _project(x, x + _expand(radius, x) * direction, eps, clip_min, clip_max)

    def step(_, carry):
      z, best = carry
      g, (losses, m) = grad_fn(z)
      best = update_best(best, z, losses, m)
      g = g / _expand(jnp.maximum(l2_norm(g), 1e-12), x)
      z = _project(x, z + _expand(alpha, x) * g, eps, clip_min, clip_max)
      return z, best

    z, best = jax.lax.fori_loop(0, steps, step, (z, best))
    _, (losses, m) = _loss_and_margin(logits_fn, z, y, loss)
    return update_best(best, z, losses, m)

  init = (x, jnp.full(eps.shape, -jnp.inf, x.dtype), jnp.zeros(eps.shape, bool))
  best_x, _, _ = jax.lax.fori_loop(0, restarts, restart, init)
  return best_x


@functools.partial(jax.jit, static_argnames='logits_fn')
def _accuracy(logits_fn, x_adv, y):
  return jnp.mean(is_correct(logits_fn(x_adv), y).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames='logits_fn')
def _violations(logits_fn, x, x_adv, y, radius, certified):
  inside = l2_norm(x_adv - x) <= radius
  return certified & inside & ~is_correct(logits_fn(x_adv), y)


def robust_accuracy(
  logits_fn: LogitsFn,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  **pgd_kwargs,
) -> jax.Array:
  """Fraction of examples still classified correctly (strictly, ties wrong) after `pgd_l2`.

  This is an upper bound on the true robust accuracy at radius eps (PGD may miss attacks).

  Arguments as in `pgd_l2` (logits_fn, x (B, H, W, C), y (B,), scalar or (B,) eps, key);
  `**pgd_kwargs` (steps, restarts, step_size, loss, clip_min, clip_max) are forwarded to it.

  Returns:
    () float32 robust accuracy in [0, 1].
  """
  x_adv = pgd_l2(logits_fn, x, y, eps, key=key, **pgd_kwargs)
  return _accuracy(logits_fn, x_adv, jnp.asarray(y))


def violation_mask(
  logits_fn: LogitsFn,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  radius: jax.typing.ArrayLike,
  certified: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  **pgd_kwargs,
) -> jax.Array:
  """Per-example certificate violations found by PGD inside the certified balls.

  Args:
    logits_fn: images (B, H, W, C) -> logits (B, K).
    x: (B, H, W, C) clean images.
    y: (B,) int labels.
    radius: (B,) certified L2 radii (finite where certified).
    certified: (B,) bool, points claimed certified (correct and radius > 0).
    key: PRNG key for the attack.
    **pgd_kwargs: forwarded to `pgd_l2`.

  Returns:
    (B,) bool: certified, ||x_adv - x||_2 <= radius (measured) and x_adv not classified as y.
  """
  x = jnp.asarray(x)
  certified = jnp.asarray(certified, bool)
  radius = jnp.where(certified, _per_example(radius, x), 0.0)
  x_adv = pgd_l2(logits_fn, x, y, radius, key=key, **pgd_kwargs)
  return _violations(logits_fn, x, x_adv, jnp.asarray(y), radius, certified)


def count_violations(
  logits_fn: LogitsFn,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  radius: jax.typing.ArrayLike,
  certified: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  **pgd_kwargs,
) -> jax.Array:
  """Number of certified points that PGD breaks within their certified radius.

  A sound certificate gives 0; any positive count proves the certificate (or the model code it
  was computed from) is wrong. Arguments as in `violation_mask`.

  Returns:
    () int32 count.
  """
  mask = violation_mask(logits_fn, x, y, radius, certified, key=key, **pgd_kwargs)
  return jnp.sum(mask, dtype=jnp.int32)


def robust_accuracy_batched(
  logits_fn: LogitsFn,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  batch_size: int = 256,
  **pgd_kwargs,
) -> jax.Array:
  """() float32 `robust_accuracy` over N examples (arguments as there), in chunks of
  `batch_size` examples: chunk i uses `jax.random.fold_in(key, i)`; progress on long runs.

  In a multi-process job every process calls it alike: each attacks its share of the chunks
  (`distributed.mine`), and the counts are summed over processes (the same result)."""
  x = jnp.asarray(x)
  eps = _per_example(eps, x)
  n = x.shape[0]
  correct = jnp.zeros((), jnp.float32)
  starts = range(0, n, batch_size)
  mine = distributed.mine(len(starts))
  bar = progress.Progress(f'PGD ({n} points)', len(mine), unit='batches')
  for j, i in enumerate(mine):
    sl = slice(starts[i], starts[i] + batch_size)
    acc = robust_accuracy(
      logits_fn, x[sl], y[sl], eps[sl], key=jax.random.fold_in(key, i), **pgd_kwargs
    )
    correct += acc * x[sl].shape[0]
    jax.block_until_ready(correct)  # so that the progress line times the work
    bar.update(j + 1)
  return jnp.asarray(distributed.total(correct), jnp.float32) / n


def random_perturbations(shape, eps: float, count: int, *, key: jax.Array, norm: str = 'l2'):
  """`count` random perturbations of shape (H, W, C): uniform on the L2 sphere of radius eps,
  or, with norm='linf', random signs times eps (a corner of the Linf ball)."""
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if norm == 'linf':
    return eps * jax.random.rademacher(key, (count, *shape), jnp.float32)
  g = jax.random.normal(key, (count, *shape))
  return eps * g / l2_norm(g).reshape(-1, *(1,) * len(shape))


def _project_universal(delta, eps, norm):
  if norm == 'linf':
    return jnp.clip(delta, -eps, eps)
  n = jnp.linalg.norm(delta)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-30))


def whitebox_universal(
  logits_fn: LogitsFn,
  images: jax.Array,
  labels: jax.Array,
  eps: float,
  *,
  key: jax.Array,
  steps: int = 200,
  batch: int = 128,
  step_size: float | None = None,
  norm: str = 'l2',
  clip: tuple[float, float] | None = (0.0, 1.0),
) -> jax.Array:
  """White-box universal perturbation (the upper reference): projected gradient ascent on the
  mean cross-entropy of `logits_fn(images + delta)` over minibatches of the images.

  Uses gradients, unlike a black-box search such as `fourier.fourier_attack`. Each step takes a
  normalised gradient step of `step_size` (default eps / 10; the sign of the gradient for
  'linf') and projects back onto the eps-ball. Minibatches are drawn with `key`.

  Returns:
    The (H, W, C) perturbation, with norm <= eps.
  """
  box = None if clip is None else tuple(clip)
  checks.check_images(images, 'images', pixel_range=box, hint=' (or pass clip=None)')
  checks.check_labels_for(logits_fn, images, labels)
  if eps < 0 or steps < 1:
    raise ValueError(f'need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}')
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  n = images.shape[0]
  batch = min(batch, n)
  size = eps / 10 if step_size is None else step_size

  def loss(delta, x, y):
    z = x + delta
    if clip is not None:
      z = jnp.clip(z, *clip)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), y))

  @jax.jit
  def run(key):
    def step(delta, k):
      idx = jax.random.choice(k, n, (batch,), replace=False)
      g = jax.grad(loss)(delta, images[idx], labels[idx])
      if norm == 'linf':
        g = jnp.sign(g)
      else:
        g = g / jnp.maximum(jnp.linalg.norm(g), 1e-30)
      return _project_universal(delta + size * g, eps, norm), None

    delta0 = jnp.zeros(images.shape[1:], jnp.float32)
    delta, _ = jax.lax.scan(step, delta0, jax.random.split(key, steps))
    return delta

  return run(key)
