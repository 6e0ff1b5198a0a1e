"""The model zoo of the flat-minima experiment: one MLP per grid point and seed, trained to a
training-loss criterion and measured before and after a neuron-wise rescaling (`train_zoo`),
then ranked against its generalisation gap (`analyse`). `experiment.run` drives both from a
`experiment.Config`; each function reads the settings it needs from it.
"""

import json
import os
import time
from collections.abc import Callable

import numpy as np

from tsuzuku_jax import distributed, models, progress, train_lib, workdir
from tsuzuku_jax.flatness import measures, rank_correlation
from tsuzuku_jax.flatness.rescaling import rescale_neurons

HPARAMS = ('width', 'depth', 'lr', 'batch', 'wd', 'noise')


def grid(config) -> dict[str, list]:
  """The zoo's hyperparameter grid: {hyperparameter: values} (`rank_correlation.grid`'s input)."""
  return dict(
    width=[int(v) for v in config.widths], depth=[int(v) for v in config.depths],
    lr=[float(v) for v in config.learning_rates], batch=[int(v) for v in config.batch_sizes],
    wd=[float(v) for v in config.weight_decays], noise=[float(v) for v in config.label_noises],
  )  # fmt: skip


def model_name(hp: dict, seed: int) -> str:
  """The folder name of one zoo model, e.g. 'w64_d2_lr0.1_b32_wd0_n0_s0'."""
  name = f'w{hp["width"]}_d{hp["depth"]}_lr{hp["lr"]:g}_b{hp["batch"]}_wd{hp["wd"]:g}'
  return name + f'_n{hp["noise"]:g}_s{seed}'


def train_model(config, hp, seed, train, test, measure_fns, path) -> dict:
  """Trains one zoo model in `path` until the loss criterion (or max_steps), then measures it
  before and after a random neuron-wise rescaling; returns its record (model.json).

  `measure_fns`: {(width, depth): jitted `measures.measure_fn`}, filled here (one compilation
  per architecture).
  """
  import jax
  import jax.numpy as jnp

  (xtr, ytr), (xte, yte) = train, test
  rng = np.random.default_rng(seed)  # label noise: a function of the seed only
  labels = ytr.copy()
  flip = rng.random(len(labels)) < hp['noise']
  labels[flip] = rng.integers(0, int(ytr.max()) + 1, int(flip.sum()))
  model = models.MLP(int(ytr.max()) + 1, (hp['width'],) * hp['depth'])
  apply_fn = lambda p, x: model.apply({'params': p}, x)  # noqa: E731
  train_config = train_lib.TrainConfig(
    steps=config.max_steps, batch_size=hp['batch'], optimizer='sgd', learning_rate=hp['lr'],
    schedule='constant', weight_decay=hp['wd'], seed=seed, log_every=config.check_every,
    checkpoint_every=config.max_steps,
  )  # fmt: skip
  xj, yj = jnp.asarray(xtr), jnp.asarray(labels)
  loss_at = jax.jit(lambda p: train_lib.cross_entropy(apply_fn(p, xj), yj))
  t0 = time.time()
  state = train_lib.train(
    model, train_config, xtr, labels, path, log=lambda s: None,
    until=lambda s: float(loss_at(s.params)) <= config.loss_criterion,
  )  # fmt: skip
  train_seconds = time.time() - t0
  params = state.params
  acc = lambda x, y: float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))  # noqa: E731
  rec = {**hp, 'seed': seed, 'steps': int(state.step), 'train_seconds': train_seconds}
  rec['train_loss'] = float(loss_at(params))
  rec['converged'] = rec['train_loss'] <= config.loss_criterion
  rec['train_acc'], rec['test_acc'] = acc(xj, yj), acc(jnp.asarray(xte), jnp.asarray(yte))
  rec['gap'] = rec['train_acc'] - rec['test_acc']
  arch = (hp['width'], hp['depth'])
  if arch not in measure_fns:  # one compilation per architecture
    measure_fns[arch] = measures.measure_fn(
      apply_fn, num_probes=config.probes, lanczos_iters=config.lanczos_iters, lam=config.lam,
      sharpness_samples=config.sharpness_samples, sharpness_iters=config.sharpness_iters,
    )  # fmt: skip
  fn = measure_fns[arch]
  key = jax.random.key(1000 + seed)  # the same probes before and after the rescaling
  layers = [f'dense{i}' for i in range(hp['depth'])] + ['head']
  scaled = rescale_neurons(
    params, layers, key=jax.random.fold_in(key, 1), low=1 / config.rescale, high=config.rescale
  )
  t0 = time.time()
  rec['measures'] = fn(params, xj, yj, key=key).to_json()
  rec['rescaled'] = fn(scaled, xj, yj, key=key).to_json()
  rec['measure_seconds'] = time.time() - t0
  rec['rescaled_output_change'] = float(
    jnp.max(jnp.abs(apply_fn(scaled, xj) - apply_fn(params, xj)))
  )
  return rec


def train_zoo(config, train, test, path: str, log: Callable[[str], None]) -> list[dict]:
  """Every zoo model's record, trained and measured in PATH/zoo/NAME; a finished model's
  model.json is read back, never recomputed (an interrupted run resumes where it stopped).

  In a multi-process job the models are shared out (process p trains models p, p + P, ...,
  each on its own devices) and every process then reads all records: the workdir must be one
  folder that every process sees.
  """
  import jax

  seeds = [int(s) for s in config.seeds]
  points = rank_correlation.grid(**grid(config))
  names = [(seed, hp, model_name(hp, seed)) for seed in seeds for hp in points]
  done = [os.path.join(path, 'zoo', name, 'model.json') for _, _, name in names]
  mine = list(range(jax.process_index(), len(names), jax.process_count()))
  before = sum(os.path.exists(done[i]) for i in mine)
  # ETA from the models trained in this invocation, the first one (compilation) left out.
  bar = progress.Progress('zoo', len(mine), unit='models', start=before, every=0.0, log=log)
  measure_fns, count = {}, before
  for i in mine:
    (seed, hp, name), record = names[i], done[i]
    if os.path.exists(record):
      continue
    try:
      rec = train_model(config, hp, seed, train, test, measure_fns, os.path.dirname(record))
    except train_lib.TrainingDiverged as e:
      rec = {**hp, 'seed': seed, 'diverged': str(e)}
    workdir.write_json(record, rec)
    count += 1
    bar.update(
      count,
      f' {name}: steps {rec.get("steps")} loss '
      f'{rec.get("train_loss", float("nan")):.4f} gap {rec.get("gap", float("nan")):.3f}',
    )
  distributed.barrier('flatness zoo: every model trained')
  rows = []
  for record in done:
    with open(record) as f:
      rows.append(json.load(f))
  return rows


def analyse(rows: list[dict]) -> tuple[dict, dict]:
  """The zoo's summary (counts, tau tables, rescaling invariance) and the scatter plot's panels
  {measure: (values, gaps, tau)} with the label noise of each plotted model under 'colors'."""
  ok = [r for r in rows if 'measures' in r]
  conv = [r for r in ok if r['converged']]
  names = [*measures.RAW_MEASURES, *measures.NORMALIZED_MEASURES, *measures.FILTER_MEASURES]
  out = {'models': len(rows), 'converged': len(conv), 'diverged': len(rows) - len(ok)}
  out['not_converged'] = [
    {k: r[k] for k in (*HPARAMS, 'seed', 'steps', 'train_loss', 'gap')}
    for r in ok
    if not r['converged']
  ]
  taus, invariance = {}, {}
  for m in names:
    flat = lambda rs, key, m=m: [{**r, m: r[key][m]} for r in rs]  # noqa: E731
    taus[m] = {
      'converged': rank_correlation.summary(flat(conv, 'measures'), m, HPARAMS) if conv else None,
      'all': rank_correlation.summary(flat(ok, 'measures'), m, HPARAMS),
      'rescaled_converged': (
        rank_correlation.summary(flat(conv, 'rescaled'), m, HPARAMS) if conv else None
      ),
    }
    ratio = np.array([r['rescaled'][m] / r['measures'][m] for r in ok])
    invariance[m] = {
      'max_relative_change': float(np.max(np.abs(ratio - 1))),
      'min_change_factor': float(np.min(np.maximum(ratio, 1 / ratio))),
      'median_change_factor': float(np.median(np.maximum(ratio, 1 / ratio))),
    }
  out['tau'], out['invariance'] = taus, invariance
  out['max_rescaled_output_change'] = max(r['rescaled_output_change'] for r in ok)
  use = conv or ok
  tau_of = 'converged' if conv else 'all'
  panels = {
    m: ([r['measures'][m] for r in use], [r['gap'] for r in use], taus[m][tau_of]['tau'])
    for m in names
  }
  return out, {'panels': panels, 'colors': [r['noise'] for r in use], 'models': len(use)}
