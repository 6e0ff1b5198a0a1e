"""The Fourier experiment: a heat map and the black-box universal Fourier attack on a trained
classifier; `run(Config(...), workdir)` from a notebook, or `experiments/fourier.py` from flags.

`run` trains (or resumes, in WORKDIR/model) a plain cross-entropy CNN, computes its Fourier heat
map on test images, runs the label-only Fourier search on `search_images` test images at each
L2 norm, evaluates the found perturbation on the held-out rest (and under every circular shift),
next to random directions and a white-box universal perturbation of the same norm, and writes
WORKDIR/results.json and WORKDIR/fourier.png. WORKDIR/run.json records the run: a later call
resumes only the same configuration and data.
"""

import dataclasses
import os
import time
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import attacks, checks, data, distributed, fourier, models, train_lib, workdir

SEARCHES = ('exhaustive', 'halving')
# Settings that cannot change a result (recorded, but a resume may change them).
NEUTRAL = ('data_dir', 'overwrite', 'workdir')
_STATS = {'mean': np.mean, 'min': np.min, 'max': np.max}


def fraction(text: str) -> float:
  """'4/255' -> 4 / 255, '0.5' -> 0.5; ValueError unless positive."""
  num, _, den = str(text).partition('/')
  try:
    value = float(num) / (float(den) if den else 1.0)
  except ZeroDivisionError:
    raise ValueError(text) from None
  if not value > 0:
    raise ValueError(text)
  return value


def _fractions_ok(texts) -> bool:
  try:
    return all(fraction(t) for t in texts)
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a Fourier run (the launcher's flags, one field each; a field's
  comment is its flag's help)."""

  CHOICES: ClassVar[dict] = dict(search=SEARCHES)

  dataset: str = 'digits'  # digits | mnist | cifar10 | npz:PATH
  channels: tuple[int, ...] = (32, 64)  # CNN channels per stage
  dense: int = 128  # CNN dense width
  steps: int = 2000  # training steps
  batch_size: int = 128  # training batch size
  learning_rate: float = 1e-3  # Adam learning rate
  # L2 norms (pixels in [0, 1]) of the perturbations; 'auto': the norm at which the random
  # baseline's directions fool `random_target` of the held-out images (bisection).
  eps: tuple[float | str, ...] = ('auto',)
  # Linf budgets such as '4/255': each adds the L2 norm eps * sqrt(H W C / 2), that of a Fourier
  # direction whose largest pixel change is eps (most frequencies).
  linf_equivalent: tuple[str, ...] = ()
  random_target: float = 0.05  # random fooling rate for 'auto'
  heat_map_images: int = 0  # test images in the heat map (0: all)
  heldout_images: int = 0  # held-out test images after the search set (0: all the rest)
  shift_stride: int = 1  # evaluate circular shifts on this grid stride (1: every shift)
  search_images: int = 256  # test images the search may query
  search: str = 'exhaustive'  # search mode
  first_images: int = 16  # halving: images in the first round
  eta: int = 4  # halving: keep 1/eta per round
  random_trials: int = 20  # random directions per norm
  uap_steps: int = 300  # white-box universal perturbation steps
  seed: int = 0  # random seed

  def __post_init__(self):
    """One message per bad field, naming it (the launcher prefixes '--')."""
    norms_ok = all(e == 'auto' or (not isinstance(e, str) and e >= 0) for e in self.eps)
    checks_ = [
      (all(c > 0 for c in self.channels) and bool(self.channels),
       f'channels must be positive integers, got {self.channels}'),
      (self.dense >= 1, f'dense must be positive, got {self.dense}'),
      (norms_ok, f'eps must be non-negative norms or "auto", got {self.eps}'),
      (_fractions_ok(self.linf_equivalent),
       'linf_equivalent must be positive numbers or fractions like 4/255, '
       f'got {self.linf_equivalent}'),
      (bool(self.eps or self.linf_equivalent),
       'eps must hold at least one norm when linf_equivalent is empty'),
      (0 <= self.random_target < 1, f'random_target must be in [0, 1), got {self.random_target}'),
      (self.heat_map_images >= 0,
       f'heat_map_images must be >= 0 (0: all), got {self.heat_map_images}'),
      (self.heldout_images >= 0,
       f'heldout_images must be >= 0 (0: all), got {self.heldout_images}'),
      (self.shift_stride >= 1, f'shift_stride must be >= 1, got {self.shift_stride}'),
      (self.search_images >= 1, f'search_images must be positive, got {self.search_images}'),
      (self.search in SEARCHES, f'search must be one of {SEARCHES}, got {self.search!r}'),
      (self.first_images >= 1, f'first_images must be positive, got {self.first_images}'),
      (self.eta >= 2, f'eta must be >= 2, got {self.eta}'),
      (self.random_trials >= 1, f'random_trials must be positive, got {self.random_trials}'),
      (self.uap_steps >= 0, f'uap_steps must be >= 0, got {self.uap_steps}'),
    ]  # fmt: skip
    for ok, msg in checks_:
      if not ok:
        raise ValueError(msg)
    self.train_config()  # steps, batch_size, learning_rate

  def train_config(self) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
      steps=self.steps,
      batch_size=self.batch_size,
      learning_rate=self.learning_rate,
      seed=self.seed,
      log_every=max(self.steps // 5, 1),
      checkpoint_every=max(self.steps, 1),
    )


def budgets(
  config: Config, query, held, held_ref, shape, *, key, log=workdir.print_flushed
) -> list[tuple]:
  """[(name, L2 norm, how it was chosen)] for `config.eps` then `config.linf_equivalent`."""
  out = []
  for e in config.eps:
    if e == 'auto':
      # The random baseline's own directions on the held-out images: by construction the
      # baseline fools <= random_target there. The attack never sees these images.
      e, rate = fourier.calibrate_eps(
        query, held, held_ref, key=jax.random.fold_in(key, 1), target=config.random_target,
        trials=config.random_trials,
      )  # fmt: skip
      e = float(np.floor(e * 1000) / 1000)  # round down: stays on the <= target side
      log(f'calibrated L2 {e:g}: random directions fool {rate:.3f} of the held-out images')
      out.append((f'{e:g}', e, f'auto: random fools <= {config.random_target:g}'))
    else:
      out.append((f'{float(e):g}', float(e), 'given'))
  for text in config.linf_equivalent:
    e = fraction(text) * float(np.sqrt(np.prod(shape) / 2))
    out.append((f'linf {text}', e, f'Linf {text} equivalent'))
  return out


def attack_at(config: Config, query, logits_fn, search, search_ref, held, held_ref, eps, *, key):
  """The Fourier search at L2 norm `eps` on `search`, and its baselines, on `held`: the
  results row (without 'eps_choice'), the Fourier and the white-box perturbations."""
  t0 = time.time()
  res = fourier.fourier_attack(
    query, search, eps, search=config.search, first_images=config.first_images, eta=config.eta
  )
  attack_s = time.time() - t0
  shape = search.shape[1:]
  randoms = attacks.random_perturbations(
    shape, eps, config.random_trials, key=jax.random.fold_in(key, 1)
  )
  rand = [fourier.fooling_rate(query, held, r, held_ref) for r in randoms]
  uap = attacks.whitebox_universal(
    logits_fn, search, search_ref, eps, key=jax.random.fold_in(key, 2), steps=config.uap_steps
  )
  stride = config.shift_stride
  four_shift = fourier.shifted_fooling_rates(query, held, res.perturbation, held_ref, stride=stride)
  uap_shift = fourier.shifted_fooling_rates(query, held, uap, held_ref, stride=stride)
  row = {
    'eps': eps,
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
  fooled = row['fourier_heldout_fooling']
  row['fourier_over_random'] = fooled / max(row['random_heldout_fooling_mean'], 1e-12)
  row['fourier_over_whitebox'] = fooled / max(row['whitebox_heldout_fooling'], 1e-12)
  return row, np.asarray(res.perturbation), np.asarray(uap)


def _summary(name: str, r: dict) -> str:
  return (
    f'{name} (L2 {r["eps"]:.3g}): Fourier {r["fourier_heldout_fooling"]:.3f} held-out '
    f'({r["fourier_search_fooling"]:.3f} search, {r["queries"]} queries, '
    f'freq {r["fourier_frequency"]}), random {r["random_heldout_fooling_mean"]:.3f}, '
    f'white-box {r["whitebox_heldout_fooling"]:.3f}; '
    f'over shifts: Fourier mean {r["fourier_shift_fooling"]["mean"]:.3f} '
    f'min {r["fourier_shift_fooling"]["min"]:.3f}, white-box mean '
    f'{r["whitebox_shift_fooling"]["mean"]:.3f}'
  )


def run(
  config: Config,
  path: str,
  *,
  overwrite: bool = False,
  log: Callable[[str], None] = workdir.print_flushed,
  cli: bool = False,
) -> dict | None:
  """Runs (or resumes, or finds complete) the experiment in `path`; returns the results dict
  (None when `path` already holds this run complete: its results.json is the answer).

  `cli`: name settings as flags ('--search_images') in messages, as the launcher does.

  Raises:
    checks.InvalidInput: `search_images` leaves no held-out test image (nothing touched).
    workdir.WorkdirMismatch: `path` holds another experiment, configuration or data (nothing
      touched). CheckpointMismatch, TrainingDiverged: as `train_lib.train`.
  """
  from tsuzuku_jax import plotting  # matplotlib: only when an experiment runs

  (xtr, ytr), (xte, yte) = data.load(config.dataset, 'train'), data.load(config.dataset, 'test')
  n = config.search_images
  if len(xte) <= n:
    prefix = '--' if cli else ''
    raise checks.InvalidInput(f'{prefix}search_images must be < the {len(xte)} test images')
  identity = data.identity(config.dataset, train=(xtr, ytr), test=(xte, yte))
  config_dict = dataclasses.asdict(config)
  if workdir.claim_experiment(path, 'fourier', config_dict, identity, neutral=NEUTRAL,
                              overwrite=overwrite, cli=cli, log=log):  # fmt: skip
    return None
  model = models.CNN(data.num_classes(ytr), tuple(config.channels), config.dense, batch_norm=False)
  mesh = data.data_mesh() if jax.device_count() > 1 else None  # every process's devices
  state = train_lib.train(
    model, config.train_config(), xtr, ytr, os.path.join(path, 'model'), mesh=mesh, log=log
  )
  logits_fn = jax.jit(train_lib.logits_fn(model, jax.device_get(state)))
  query = jax.jit(lambda x: jnp.argmax(logits_fn(x), -1))
  pred = np.concatenate([np.asarray(query(xte[i : i + 1000])) for i in range(0, len(xte), 1000)])
  clean_acc = float(np.mean(pred == yte))
  log(f'clean test accuracy {clean_acc:.4f}')
  search, held, held_ref = xte[:n], xte[n:], pred[n:]
  if config.heldout_images:
    held, held_ref = held[: config.heldout_images], held_ref[: config.heldout_images]
  key = jax.random.key(config.seed)
  norms = budgets(config, query, held, held_ref, xte.shape[1:], key=key, log=log)
  k = config.heat_map_images or len(xte)
  heat_x, heat_y = xte[:k], yte[:k]
  t0 = time.time()
  heat_err, _ = fourier.heat_map(logits_fn, heat_x, heat_y, norms[0][1], key=key, batch=256)
  heat_err = np.asarray(heat_err[0])
  results = {
    'dataset': config.dataset,
    'seed': config.seed,
    'clean_accuracy': clean_acc,
    'search_images': n,
    'heldout_images': len(held),
    'heat_map_eps': norms[0][1],
    'heat_map_images': len(heat_x),
    'heat_map_seconds': time.time() - t0,
    'heat_map_error': heat_err.tolist(),
    'per_eps': {},
    'config': dataclasses.asdict(config),
  }
  maps = {f'heat map, error at L2 {norms[0][1]:.3g}': heat_err}
  for name, eps, how in norms:
    row, four, uap = attack_at(config, query, logits_fn, search, pred[:n], held, held_ref, eps,
                               key=key)  # fmt: skip
    results['per_eps'][name] = row = {'eps': eps, 'eps_choice': how, **row}
    log(_summary(name, row))
    maps[f'Fourier, L2 {eps:.3g}'] = four
    maps[f'white-box, L2 {eps:.3g}'] = uap
  results_path = os.path.join(path, 'results.json')
  if distributed.is_primary():  # one writer of the shared files in a multi-process job
    label = 'error rate (fraction of images misclassified)'
    plotting.plot_fourier_maps(
      maps, os.path.join(path, 'fourier.png'), title=config.dataset, colorbar_label=label
    )
    workdir.write_json(results_path, {'experiment': 'fourier', **results})
  log(f'wrote {results_path}')
  return results
