r"""Normalized flatness over a model zoo, and PAC-Bayes bounds, from flags.

  python experiments/flatness.py --flagfile=experiments/configs/flatness_digits.flags \
      --workdir=runs/flatness_digits

Zoo: trains one MLP per grid point and seed in WORKDIR/zoo/NAME until its training
cross-entropy (on the labels it was trained on, noise included) reaches --loss_criterion,
checked every --check_every steps, or --max_steps pass; computes every measure of
`flatness.measure_fn` on the training set, and again after a random neuron-wise rescaling.
A finished model's model.json is never recomputed: an interrupted run resumes where it stopped.
Bound: trains a prior on --prior_fraction of the training set, optimises a Gaussian posterior
on the rest and certifies its test error there (the prior never sees those examples).
Writes WORKDIR/results.json (tau tables, invariance, bounds) and WORKDIR/flatness.png at the
end. WORKDIR/run.json records the run: a later invocation resumes only the same flags and data
(see experiments/common.py).
"""

import json
import os
import time

import common
import numpy as np
from absl import app, flags, logging

from tsuzuku_jax import data, flatness, models, plotting, train_lib, workdir
from tsuzuku_jax.flatness import pac_bayes, posterior, rank_correlation

_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'digits | mnist | cifar10 | npz:PATH.')
_ZOO = flags.DEFINE_bool('zoo', True, 'Train and measure the model zoo.')
_WIDTHS = flags.DEFINE_list('widths', ['64', '256'], 'Zoo: hidden widths.')
_DEPTHS = flags.DEFINE_list('depths', ['2', '3'], 'Zoo: hidden layers.')
_LRS = flags.DEFINE_list('learning_rates', ['0.03', '0.1'], 'Zoo: SGD learning rates.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32', '128'], 'Zoo: batch sizes.')
_WDS = flags.DEFINE_list('weight_decays', ['0', '1e-4'], 'Zoo: weight decays.')
_NOISES = flags.DEFINE_list('label_noises', ['0', '0.1'], 'Zoo: fraction of relabelled examples.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Zoo: seeds (one zoo each).')
_CRITERION = flags.DEFINE_float('loss_criterion', 0.01, 'Stop at this training cross-entropy.')
_CHECK = flags.DEFINE_integer('check_every', 250, 'Steps between criterion checks.')
_MAX_STEPS = flags.DEFINE_integer('max_steps', 8000, 'Give up (not converged) after this.')
_PROBES = flags.DEFINE_integer('probes', 32, 'Hutchinson probes per trace.')
_LANCZOS = flags.DEFINE_integer('lanczos_iters', 20, 'Lanczos steps for the top eigenvalue.')
_LAM = flags.DEFINE_float('lam', 1e-3, 'lambda of the sigma-optimised measure.')
_SHARP_N = flags.DEFINE_integer('sharpness_samples', 8, 'Noise draws per sharpness bisection.')
_SHARP_IT = flags.DEFINE_integer('sharpness_iters', 14, 'Bisection steps on log sigma.')
_RESCALE = flags.DEFINE_float('rescale', 10.0, 'Neuron-wise factors are in [1/r, r].')
_BOUND = flags.DEFINE_bool('bound', True, 'Compute the PAC-Bayes bounds.')
_B_HIDDEN = flags.DEFINE_list('bound_hidden', ['256'], 'Bound model: MLP hidden widths.')
_PRIOR_FRAC = flags.DEFINE_float('prior_fraction', 0.5, 'Training data used to fit the prior.')
_PRIOR_STEPS = flags.DEFINE_integer('prior_steps', 1000, 'SGD steps fitting the prior mean.')
_POST_STEPS = flags.DEFINE_integer('posterior_steps', 2000, 'Adam steps on the posterior.')
_POST_LR = flags.DEFINE_float('posterior_lr', 1e-3, 'Posterior learning rate.')
_SIGMAS = flags.DEFINE_list('prior_sigmas', ['0.01', '0.03', '0.1'], 'Prior scales (union).')
_MC = flags.DEFINE_integer('mc_samples', 1000, 'Sampled networks in the certificate.')
_DELTA = flags.DEFINE_float('delta', 0.025, 'PAC-Bayes confidence (over all prior scales).')
_DELTA_MC = flags.DEFINE_float('delta_mc', 0.01, 'Sampling confidence (over all prior scales).')
_SEED = flags.DEFINE_integer('seed', 0, 'Bound: random seed.')

HPARAMS = ('width', 'depth', 'lr', 'batch', 'wd', 'noise')


def _numbers(flag, kind):
  try:
    vals = [kind(v) for v in flag.value]
  except ValueError:
    raise app.UsageError(
      f'--{flag.name} must be a list of {kind.__name__}s: {flag.value}'
    ) from None
  if not vals or any(v < 0 for v in vals):
    raise app.UsageError(f'--{flag.name} must be a non-empty list of values >= 0: {flag.value}')
  return vals


def _validate() -> dict:
  common.check_workdir()
  try:
    data.validate_name(_DATASET.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  grid = dict(
    width=_numbers(_WIDTHS, int), depth=_numbers(_DEPTHS, int), lr=_numbers(_LRS, float),
    batch=_numbers(_BATCHES, int), wd=_numbers(_WDS, float), noise=_numbers(_NOISES, float),
  )  # fmt: skip
  if min(grid['width'] + grid['depth'] + grid['batch']) < 1 or min(grid['lr']) <= 0:
    raise app.UsageError('--widths, --depths, --batch_sizes and --learning_rates must be > 0')
  if max(grid['noise']) > 1:
    raise app.UsageError(f'--label_noises must be fractions in [0, 1]: {_NOISES.value}')
  for flag in (
    _CHECK,
    _MAX_STEPS,
    _PROBES,
    _LANCZOS,
    _SHARP_N,
    _SHARP_IT,
    _MC,
    _PRIOR_STEPS,
    _POST_STEPS,
  ):
    if flag.value < 1:
      raise app.UsageError(f'--{flag.name} must be >= 1, got {flag.value}')
  if not 0 < _PRIOR_FRAC.value < 1:
    raise app.UsageError(f'--prior_fraction must be in (0, 1), got {_PRIOR_FRAC.value}')
  for flag in (_DELTA, _DELTA_MC):
    if not 0 < flag.value < 1:
      raise app.UsageError(f'--{flag.name} (a confidence) must be in (0, 1), got {flag.value}')
  if _RESCALE.value < 1:
    raise app.UsageError(f'--rescale must be >= 1, got {_RESCALE.value}')
  _numbers(_SIGMAS, float)
  return grid


def _train_model(hp, seed, xtr, ytr, xte, yte, measure_fns, workdir):
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)  # label noise: a function of the seed only
  labels = ytr.copy()
  flip = rng.random(len(labels)) < hp['noise']
  labels[flip] = rng.integers(0, int(ytr.max()) + 1, int(flip.sum()))
  model = models.MLP(int(ytr.max()) + 1, (hp['width'],) * hp['depth'])
  apply_fn = lambda p, x: model.apply({'params': p}, x)  # noqa: E731
  config = train_lib.TrainConfig(
    steps=_MAX_STEPS.value, batch_size=hp['batch'], optimizer='sgd', learning_rate=hp['lr'],
    schedule='constant', weight_decay=hp['wd'], seed=seed, log_every=_CHECK.value,
    checkpoint_every=_MAX_STEPS.value,
  )  # fmt: skip
  xj, yj = jnp.asarray(xtr), jnp.asarray(labels)
  loss_at = jax.jit(lambda p: flatness.measures._cross_entropy(apply_fn(p, xj), yj))
  t0 = time.time()
  state = train_lib.train(
    model, config, xtr, labels, workdir, log=lambda s: None,
    until=lambda s: float(loss_at(s.params)) <= _CRITERION.value,
  )  # fmt: skip
  train_seconds = time.time() - t0
  params = state.params
  acc = lambda x, y: float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))  # noqa: E731
  rec = {**hp, 'seed': seed, 'steps': int(state.step), 'train_seconds': train_seconds}
  rec['train_loss'] = float(loss_at(params))
  rec['converged'] = rec['train_loss'] <= _CRITERION.value
  rec['train_acc'], rec['test_acc'] = acc(xj, yj), acc(jnp.asarray(xte), jnp.asarray(yte))
  rec['gap'] = rec['train_acc'] - rec['test_acc']
  arch = (hp['width'], hp['depth'])
  if arch not in measure_fns:  # one compilation per architecture
    measure_fns[arch] = flatness.measure_fn(
      apply_fn, num_probes=_PROBES.value, lanczos_iters=_LANCZOS.value, lam=_LAM.value,
      sharpness_samples=_SHARP_N.value, sharpness_iters=_SHARP_IT.value,
    )  # fmt: skip
  fn = measure_fns[arch]
  key = jax.random.key(1000 + seed)  # the same probes before and after the rescaling
  layers = [f'dense{i}' for i in range(hp['depth'])] + ['head']
  scaled = flatness.rescale_neurons(
    params, layers, jax.random.fold_in(key, 1), 1 / _RESCALE.value, _RESCALE.value
  )
  t0 = time.time()
  rec['measures'] = {k: float(v) for k, v in jax.device_get(fn(params, xj, yj, key)).items()}
  rec['rescaled'] = {k: float(v) for k, v in jax.device_get(fn(scaled, xj, yj, key)).items()}
  rec['measure_seconds'] = time.time() - t0
  rec['rescaled_output_change'] = float(
    jnp.max(jnp.abs(apply_fn(scaled, xj) - apply_fn(params, xj)))
  )
  return rec


def _zoo(grid, xtr, ytr, xte, yte):
  seeds = _numbers(_SEEDS, int)
  points = rank_correlation.grid(**grid)
  rows, measure_fns = [], {}
  total = len(points) * len(seeds)
  for seed in seeds:
    for hp in points:
      name = f'w{hp["width"]}_d{hp["depth"]}_lr{hp["lr"]:g}_b{hp["batch"]}_wd{hp["wd"]:g}'
      name += f'_n{hp["noise"]:g}_s{seed}'
      path = os.path.join(_WORKDIR.value, 'zoo', name)
      done = os.path.join(path, 'model.json')
      if os.path.exists(done):
        with open(done) as f:
          rows.append(json.load(f))
        continue
      try:
        rec = _train_model(hp, seed, xtr, ytr, xte, yte, measure_fns, path)
      except train_lib.TrainingDiverged as e:
        rec = {**hp, 'seed': seed, 'diverged': str(e)}
      workdir.write_json(done, rec)
      rows.append(rec)
      print(
        f'[{len(rows)}/{total}] {name}: steps {rec.get("steps")} loss '
        f'{rec.get("train_loss", float("nan")):.4f} gap {rec.get("gap", float("nan")):.3f}',
        flush=True,
      )
  return rows


def _analyse(rows):
  ok = [r for r in rows if 'measures' in r]
  conv = [r for r in ok if r['converged']]
  names = [*flatness.RAW_MEASURES, *flatness.NORMALIZED_MEASURES, *flatness.FILTER_MEASURES]
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
  panels = {
    m: ([r['measures'][m] for r in use], [r['gap'] for r in use], taus[m]['all']['tau'])
    for m in names
  }
  if conv:
    panels = {m: (*v[:2], taus[m]['converged']['tau']) for m, v in panels.items()}
  plotting.plot_measure_scatter(
    panels, os.path.join(_WORKDIR.value, 'flatness.png'), colors=[r['noise'] for r in use],
    color_label='label noise', title=f'{_DATASET.value}: {len(use)} models',
  )  # fmt: skip
  return out


def _bound(xtr, ytr, xte, yte):
  import jax
  import jax.numpy as jnp

  perm = np.random.default_rng(_SEED.value).permutation(len(ytr))
  n_prior = int(len(ytr) * _PRIOR_FRAC.value)
  prior_idx, bound_idx = perm[:n_prior], perm[n_prior:]
  model = models.MLP(int(ytr.max()) + 1, tuple(int(h) for h in _B_HIDDEN.value))
  apply_fn = lambda p, x: model.apply({'params': p}, x)  # noqa: E731
  config = train_lib.TrainConfig(
    steps=_PRIOR_STEPS.value, batch_size=128, optimizer='sgd', learning_rate=0.05,
    schedule='constant', seed=_SEED.value, log_every=max(_PRIOR_STEPS.value // 4, 1),
    checkpoint_every=_PRIOR_STEPS.value,
  )  # fmt: skip
  init = train_lib.create_state(model, config, xtr.shape[1:])[0].params
  prior = train_lib.train(
    model, config, xtr[prior_idx], ytr[prior_idx], os.path.join(_WORKDIR.value, 'prior')
  ).params
  xb, yb = jnp.asarray(xtr[bound_idx]), jnp.asarray(ytr[bound_idx])
  xt, yt = jnp.asarray(xte), jnp.asarray(yte)
  sigmas = _numbers(_SIGMAS, float)
  delta = pac_bayes.union_delta(_DELTA.value, 2 * len(sigmas))  # both priors, every scale
  delta_mc = pac_bayes.union_delta(_DELTA_MC.value, 2 * len(sigmas))
  out = {'m': len(bound_idx), 'prior_examples': n_prior, 'delta': _DELTA.value}
  out['delta_mc'], out['rows'] = _DELTA_MC.value, []
  key = jax.random.key(_SEED.value)
  for prior_name, prior_mean in (('held_out_data', prior), ('initialisation', init)):
    for i, s in enumerate(sigmas):
      k = jax.random.fold_in(key, 2 * i + (prior_name == 'initialisation'))
      t0 = time.time()
      # Data as jit arguments: closed-over arrays would be constant-folded (minutes on MNIST).
      fit = jax.jit(
        lambda p, k, x, y, s=s: posterior.fit_posterior(
          apply_fn,
          p,
          s,
          x,
          y,
          k,
          delta=delta,
          steps=_POST_STEPS.value,
          learning_rate=_POST_LR.value,
        )  # fmt: skip
      )
      mean, sigma, objective = fit(prior_mean, k, xb, yb)
      cert = posterior.certify(
        apply_fn, mean, sigma, prior_mean, s, xb, yb, jax.random.fold_in(k, 1),
        num_samples=_MC.value, delta=delta, delta_mc=delta_mc,
      )  # fmt: skip
      test = posterior.sampled_errors(apply_fn, mean, sigma, xt, yt, jax.random.fold_in(k, 2), 100)
      row = {'prior': prior_name, 'prior_sigma': s, **cert, 'objective': float(objective)}
      row['stochastic_test_error'] = float(jnp.mean(test))
      row['mean_test_error'] = float(jnp.mean(jnp.argmax(apply_fn(mean, xt), -1) != yt))
      row['seconds'] = time.time() - t0
      out['rows'].append(row)
      print(
        f'bound ({prior_name} prior, sigma {s:g}): {cert["bound"]:.4f} '
        f'(train {cert["emp_mean"]:.4f}, KL {cert["kl"]:.1f}, '
        f'test {row["stochastic_test_error"]:.4f})',
        flush=True,
      )
  for prior_name in ('held_out_data', 'initialisation'):
    rows = [r for r in out['rows'] if r['prior'] == prior_name]
    out[f'best_{prior_name}'] = min(rows, key=lambda r: r['bound'])
  out['confidence'] = 1 - _DELTA.value - _DELTA_MC.value
  return out


def main(argv):
  del argv
  grid = _validate()
  logging.set_verbosity(logging.WARNING)
  xtr, ytr = data.load(_DATASET.value, 'train')
  xte, yte = data.load(_DATASET.value, 'test')
  if common.open_workdir(
    'flatness', data.identity(_DATASET.value, train=(xtr, ytr), test=(xte, yte))
  ):
    return
  results = {'dataset': _DATASET.value, 'flags': common.config()}
  if _ZOO.value:
    results['zoo'] = _analyse(_zoo(grid, xtr, ytr, xte, yte))
    print(f'zoo: {results["zoo"]["converged"]}/{results["zoo"]["models"]} converged', flush=True)
    for m in (*flatness.RAW_MEASURES, *flatness.NORMALIZED_MEASURES):
      t = results['zoo']['tau'][m]['converged'] or results['zoo']['tau'][m]['all']
      print(f'  {m:24s} tau {t["tau"]:+.3f} psi {t["granulated"]["psi"]:+.3f}', flush=True)
  if _BOUND.value:
    results['bound'] = _bound(xtr, ytr, xte, yte)
  common.write_results('flatness', results)


if __name__ == '__main__':
  common.run(main)
