r"""Fourier heat map and black-box universal Fourier attack on a trained classifier, from flags.

  python experiments/fourier.py --flagfile=experiments/configs/fourier_digits.flags \
      --workdir=runs/fourier_digits

Trains (or resumes, in WORKDIR/model) a plain cross-entropy model, computes its Fourier heat map
on test images, runs the label-only Fourier search on --search_images test images at each L2
norm, evaluates the found perturbation on the held-out rest (and under every circular shift),
next to random directions and a white-box universal perturbation of the same norm, and writes
WORKDIR/results.json and WORKDIR/fourier.png. WORKDIR/run.json records the run: a later
invocation resumes only the same flags and data (see experiments/common.py).
"""

import os
import time

import common
import numpy as np
from absl import app, flags, logging

from tsuzuku_jax import attacks, data, fourier, models, plotting, train_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'digits | mnist | cifar10 | npz:PATH.')
_CHANNELS = flags.DEFINE_list('channels', ['32', '64'], 'CNN channels per stage.')
_DENSE = flags.DEFINE_integer('dense', 128, 'CNN dense width.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
_LR = flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate.')
_EPS = flags.DEFINE_list(
  'eps',
  ['auto'],
  'L2 norms (pixels in [0, 1]) of the perturbations; "auto": the norm at which the random '
  "baseline's directions fool --random_target of the held-out images (bisection).",
)
_LINF_EQ = flags.DEFINE_list(
  'linf_equivalent',
  [],
  'Linf budgets such as 4/255: each adds the L2 norm eps * sqrt(H W C / 2), that of a Fourier '
  'direction whose largest pixel change is eps (most frequencies; the others change no pixel by '
  'more than eps at that norm).',
)
_RANDOM_TARGET = flags.DEFINE_float('random_target', 0.05, 'Random fooling rate for "auto".')
_HEAT_N = flags.DEFINE_integer('heat_map_images', 0, 'Test images in the heat map (0: all).')
_HELD_N = flags.DEFINE_integer(
  'heldout_images', 0, 'Held-out test images after the search set (0: all the rest).'
)
_SHIFT_STRIDE = flags.DEFINE_integer(
  'shift_stride', 1, 'Evaluate circular shifts on this grid stride (1: every shift).'
)
_SEARCH_N = flags.DEFINE_integer('search_images', 256, 'Test images the search may query.')
_SEARCH = flags.DEFINE_enum('search', 'exhaustive', ['exhaustive', 'halving'], 'Search mode.')
_FIRST = flags.DEFINE_integer('first_images', 16, 'Halving: images in the first round.')
_ETA = flags.DEFINE_integer('eta', 4, 'Halving: keep 1/eta per round.')
_RANDOM = flags.DEFINE_integer('random_trials', 20, 'Random directions per norm.')
_UAP_STEPS = flags.DEFINE_integer('uap_steps', 300, 'White-box universal perturbation steps.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def _fraction(text: str) -> float:
  num, _, den = text.partition('/')
  value = float(num) / (float(den) if den else 1.0)
  if not value > 0:
    raise ValueError(text)
  return value


def _validate() -> tuple[list[float | None], list[tuple[str, float]]]:
  common.check_workdir()
  try:
    data.validate_name(_DATASET.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  try:
    eps = [None if e == 'auto' else float(e) for e in _EPS.value]
  except ValueError:
    raise app.UsageError(f'--eps must be numbers or "auto", got {_EPS.value}') from None
  if any(e is not None and e < 0 for e in eps):
    raise app.UsageError(f'--eps must be non-negative norms, got {_EPS.value}')
  try:
    linf = [(e, _fraction(e)) for e in _LINF_EQ.value]
  except (ValueError, ZeroDivisionError):
    raise app.UsageError(
      f'--linf_equivalent must be positive numbers or fractions like 4/255, got {_LINF_EQ.value}'
    ) from None
  if not eps and not linf:
    raise app.UsageError('give at least one norm in --eps or --linf_equivalent')
  if not 0 <= _RANDOM_TARGET.value < 1:
    raise app.UsageError(f'--random_target must be in [0, 1), got {_RANDOM_TARGET.value}')
  for flag in (_HEAT_N, _HELD_N):
    if flag.value < 0:
      raise app.UsageError(f'--{flag.name} must be >= 0 (0: all), got {flag.value}')
  if _SHIFT_STRIDE.value < 1:
    raise app.UsageError(f'--shift_stride must be >= 1, got {_SHIFT_STRIDE.value}')
  if not all(v.isdigit() and int(v) > 0 for v in _CHANNELS.value):
    raise app.UsageError(f'--channels must be positive integers, got {_CHANNELS.value}')
  if _SEARCH_N.value < 1 or _RANDOM.value < 1:
    raise app.UsageError('--search_images and --random_trials must be positive')
  return eps, linf


def main(argv):
  del argv
  eps_arg, linf_arg = _validate()
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp

  xtr, ytr = data.load(_DATASET.value, 'train')
  xte, yte = data.load(_DATASET.value, 'test')
  if len(xte) <= _SEARCH_N.value:
    raise app.UsageError(f'--search_images must be < the {len(xte)} test images')
  if common.open_workdir(
    'fourier', data.identity(_DATASET.value, train=(xtr, ytr), test=(xte, yte))
  ):
    return
  channels = tuple(int(c) for c in _CHANNELS.value)
  model = models.CNN(data.num_classes(ytr), channels, _DENSE.value, batch_norm=False)
  config = train_lib.TrainConfig(
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    learning_rate=_LR.value,
    seed=_SEED.value,
    log_every=max(_STEPS.value // 5, 1),
    checkpoint_every=_STEPS.value,
  )
  state = train_lib.train(model, config, xtr, ytr, os.path.join(_WORKDIR.value, 'model'))
  logits_fn = jax.jit(train_lib.logits_fn(model, jax.device_get(state)))
  query = jax.jit(lambda x: jnp.argmax(logits_fn(x), -1))
  pred = np.concatenate([np.asarray(query(xte[i : i + 1000])) for i in range(0, len(xte), 1000)])
  clean_acc = float(np.mean(pred == yte))
  print(f'clean test accuracy {clean_acc:.4f}', flush=True)
  n = _SEARCH_N.value
  search, held = xte[:n], xte[n:]
  held_ref = pred[n:]
  if _HELD_N.value:
    held, held_ref = held[: _HELD_N.value], held_ref[: _HELD_N.value]
  key = jax.random.key(_SEED.value)
  hw_c = xte.shape[1:]
  budgets = []  # (name, eps, how it was chosen)
  for e in eps_arg:
    if e is None:
      # The random baseline's own directions on the held-out images: by construction the
      # baseline fools <= --random_target there. The attack never sees these images.
      e, rate = fourier.calibrate_eps(
        query,
        held,
        held_ref,
        key=jax.random.fold_in(key, 1),
        target=_RANDOM_TARGET.value,
        trials=_RANDOM.value,
      )
      e = float(np.floor(e * 1000) / 1000)  # round down: stays on the <= target side
      print(f'calibrated L2 {e:g}: random directions fool {rate:.3f} of the held-out images')
      budgets.append((f'{e:g}', e, f'auto: random fools <= {_RANDOM_TARGET.value:g}'))
    else:
      budgets.append((f'{e:g}', e, 'given'))
  for text, value in linf_arg:
    e = value * float(np.sqrt(np.prod(hw_c) / 2))
    budgets.append((f'linf {text}', e, f'Linf {text} equivalent'))
  heat_x, heat_y = (xte, yte) if not _HEAT_N.value else (xte[: _HEAT_N.value], yte[: _HEAT_N.value])
  t0 = time.time()
  heat_err, _ = fourier.heat_map(logits_fn, heat_x, heat_y, budgets[0][1], key=key, batch=256)
  heat_err = np.asarray(heat_err[0])
  results = {
    'dataset': _DATASET.value,
    'seed': _SEED.value,
    'clean_accuracy': clean_acc,
    'search_images': n,
    'heldout_images': len(held),
    'heat_map_eps': budgets[0][1],
    'heat_map_images': len(heat_x),
    'heat_map_seconds': time.time() - t0,
    'heat_map_error': heat_err.tolist(),
    'per_eps': {},
  }
  maps = {f'heat map, error at L2 {budgets[0][1]:.3g}': heat_err}
  for name, eps, how in budgets:
    t0 = time.time()
    res = fourier.fourier_attack(
      query, search, eps, search=_SEARCH.value, first_images=_FIRST.value, eta=_ETA.value
    )
    attack_s = time.time() - t0
    randoms = attacks.random_perturbations(jax.random.fold_in(key, 1), hw_c, eps, _RANDOM.value)
    rand = [fourier.fooling_rate(query, held, r, held_ref) for r in randoms]
    uap = attacks.whitebox_universal(
      logits_fn, search, pred[:n], eps, key=jax.random.fold_in(key, 2), steps=_UAP_STEPS.value
    )
    stride = _SHIFT_STRIDE.value
    four_shift = fourier.shifted_fooling_rates(
      query, held, res.perturbation, held_ref, stride=stride
    )
    uap_shift = fourier.shifted_fooling_rates(query, held, uap, held_ref, stride=stride)
    row = {
      'eps': eps,
      'eps_choice': how,
      'fourier_search_fooling': res.fooling_rate,
      'fourier_heldout_fooling': fourier.fooling_rate(query, held, res.perturbation, held_ref),
      'fourier_frequency': res.frequency,
      'fourier_signs': res.signs,
      'queries': res.queries,
      'attack_seconds': attack_s,
      'random_heldout_fooling_mean': float(np.mean(rand)),
      'random_heldout_fooling_max': float(np.max(rand)),
      'whitebox_heldout_fooling': fourier.fooling_rate(query, held, uap, held_ref),
      'fourier_shift_fooling': {k: float(f(four_shift)) for k, f in _STATS.items()},
      'whitebox_shift_fooling': {k: float(f(uap_shift)) for k, f in _STATS.items()},
    }
    r = row
    r['fourier_over_random'] = r['fourier_heldout_fooling'] / max(
      r['random_heldout_fooling_mean'], 1e-12
    )
    r['fourier_over_whitebox'] = r['fourier_heldout_fooling'] / max(
      r['whitebox_heldout_fooling'], 1e-12
    )
    results['per_eps'][name] = row
    print(
      f'{name} (L2 {eps:.3g}): Fourier {r["fourier_heldout_fooling"]:.3f} held-out '
      f'({r["fourier_search_fooling"]:.3f} search, {res.queries} queries, freq {res.frequency}), '
      f'random {r["random_heldout_fooling_mean"]:.3f}, '
      f'white-box {r["whitebox_heldout_fooling"]:.3f}; '
      f'over shifts: Fourier mean {r["fourier_shift_fooling"]["mean"]:.3f} '
      f'min {r["fourier_shift_fooling"]["min"]:.3f}, white-box mean '
      f'{r["whitebox_shift_fooling"]["mean"]:.3f}',
      flush=True,
    )
    maps[f'Fourier, L2 {eps:.3g}'] = np.asarray(res.perturbation)
    maps[f'white-box, L2 {eps:.3g}'] = np.asarray(uap)
  plotting.plot_fourier_maps(
    maps, os.path.join(_WORKDIR.value, 'fourier.png'), title=_DATASET.value
  )
  common.write_results('fourier', results)


_STATS = {'mean': np.mean, 'min': np.min, 'max': np.max}

if __name__ == '__main__':
  common.run(main)
