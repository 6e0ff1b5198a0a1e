"""The flat-minima experiment: normalized flatness over a model zoo, and PAC-Bayes bounds;
`run(Config(...), workdir)` from a notebook, or `experiments/flatness.py` from flags.

Zoo (`zoo`): trains one MLP per grid point and seed in WORKDIR/zoo/NAME until its training
cross-entropy (on the labels it was trained on, noise included) reaches `loss_criterion`,
checked every `check_every` steps, or `max_steps` pass; computes every measure of
`flatness.measure_fn` on the training set, and again after a random neuron-wise rescaling.
A finished model's model.json is never recomputed: an interrupted run resumes where it stopped.
Bound: trains a prior on `prior_fraction` of the training set, optimises a Gaussian posterior
(on the whole training set, or with `--noposterior_on_all` on the rest only) and certifies its
test error on the rest, which the prior never saw: `mc_rounds` rounds in which every one of
those examples is classified by its own sampled network (exact local reparametrisation of the
MLP), resumable round by round (WORKDIR/bound/*/mc.json).
Writes WORKDIR/results.json (tau tables, invariance, bounds) and WORKDIR/flatness.png at the
end. WORKDIR/run.json records the run: a later call resumes only the same configuration and data.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import numpy as np

from tsuzuku_jax import data, distributed, models, train_lib, workdir
from tsuzuku_jax.flatness import measures, pac_bayes, posterior, zoo

# Settings that cannot change a result (recorded, but a resume may change them).
NEUTRAL = ('overwrite', 'workdir')
_POSITIVE_INTS = ('check_every', 'max_steps', 'probes', 'lanczos_iters', 'sharpness_samples',
                  'sharpness_iters', 'mc_rounds', 'prior_steps')  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a flatness run (the launcher's flags, one field each)."""

  dataset: str = 'digits'  # digits | mnist | cifar10 | npz:PATH
  zoo: bool = True  # train and measure the model zoo
  widths: tuple[int, ...] = (64, 256)  # zoo: hidden widths
  depths: tuple[int, ...] = (2, 3)  # zoo: hidden layers
  learning_rates: tuple[float, ...] = (0.03, 0.1)  # zoo: SGD learning rates
  batch_sizes: tuple[int, ...] = (32, 128)  # zoo: batch sizes
  weight_decays: tuple[float, ...] = (0.0, 1e-4)  # zoo: weight decays
  label_noises: tuple[float, ...] = (0.0, 0.1)  # zoo: fraction of relabelled examples
  seeds: tuple[int, ...] = (0, 1)  # zoo: seeds (one zoo each)
  loss_criterion: float = 0.01  # stop at this training cross-entropy
  check_every: int = 250  # steps between criterion checks
  max_steps: int = 8000  # give up (not converged) after this
  probes: int = 32  # Hutchinson probes per trace
  lanczos_iters: int = 20  # Lanczos steps for the top eigenvalue
  lam: float = 1e-3  # lambda of the sigma-optimised measure
  sharpness_samples: int = 8  # noise draws per sharpness bisection
  sharpness_iters: int = 14  # bisection steps on log sigma
  rescale: float = 10.0  # neuron-wise factors are in [1/r, r]
  bound: bool = True  # compute the PAC-Bayes bounds
  bound_hidden: tuple[int, ...] = (256,)  # bound model: MLP hidden widths
  prior_fraction: float = 0.5  # training data used to fit the prior
  prior_steps: int = 1000  # SGD steps fitting the prior mean
  prior_lr: float = 0.05  # prior: SGD learning rate (cosine decay)
  prior_dropout: float = 0.0  # prior: dropout rate after each hidden layer (training only)
  # Adam steps on the posterior (0: the posterior is the prior itself, KL 0)
  posterior_steps: int = 2000
  posterior_lr: float = 1e-3  # posterior learning rate
  posterior_on_all: bool = True  # fit the posterior on the whole training set (else the bound set)
  prior_sigmas: tuple[float, ...] = (0.01, 0.03, 0.1)  # prior scales (union bound)
  init_prior: bool = True  # also certify with the prior at the initialisation (data-free)
  # Monte Carlo rounds in the certificate: each classifies every bound example by its own
  # sampled network (rounds x m independent draws)
  mc_rounds: int = 10
  delta: float = 0.025  # PAC-Bayes confidence (over all prior scales)
  delta_mc: float = 0.01  # sampling confidence (over all prior scales)
  seed: int = 0  # bound: random seed

  def __post_init__(self):
    """One message per bad field, naming it (the launcher prefixes '--')."""
    positive = lambda vs: bool(vs) and all(v > 0 for v in vs)  # noqa: E731
    checks = [
      (positive(self.widths), f'widths must be positive integers, got {self.widths}'),
      (positive(self.depths), f'depths must be positive integers, got {self.depths}'),
      (positive(self.learning_rates),
       f'learning_rates must be positive numbers, got {self.learning_rates}'),
      (positive(self.batch_sizes),
       f'batch_sizes must be positive integers, got {self.batch_sizes}'),
      (bool(self.weight_decays) and min(self.weight_decays) >= 0,
       f'weight_decays must be numbers >= 0, got {self.weight_decays}'),
      (bool(self.label_noises) and all(0 <= v <= 1 for v in self.label_noises),
       f'label_noises must be fractions in [0, 1], got {self.label_noises}'),
      (bool(self.seeds) and min(self.seeds) >= 0,
       f'seeds must be integers >= 0, got {self.seeds}'),
      (positive(self.bound_hidden),
       f'bound_hidden must be positive integers, got {self.bound_hidden}'),
      (positive(self.prior_sigmas),
       f'prior_sigmas must be positive numbers, got {self.prior_sigmas}'),
      *((getattr(self, n) >= 1, f'{n} must be >= 1, got {getattr(self, n)}')
        for n in _POSITIVE_INTS),
      (self.prior_lr > 0, f'prior_lr must be positive, got {self.prior_lr}'),
      (self.posterior_steps >= 0, f'posterior_steps must be >= 0, got {self.posterior_steps}'),
      (0 <= self.prior_dropout < 1, f'prior_dropout must be in [0, 1), got {self.prior_dropout}'),
      (self.posterior_lr > 0, f'posterior_lr must be positive, got {self.posterior_lr}'),
      (0 < self.prior_fraction < 1,
       f'prior_fraction must be in (0, 1), got {self.prior_fraction}'),
      (0 < self.delta < 1, f'delta (a confidence) must be in (0, 1), got {self.delta}'),
      (0 < self.delta_mc < 1, f'delta_mc (a confidence) must be in (0, 1), got {self.delta_mc}'),
      (self.rescale >= 1, f'rescale must be >= 1, got {self.rescale}'),
      (self.seed >= 0, f'seed must be >= 0, got {self.seed}'),
    ]  # fmt: skip
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)


def _certify(config, model, apply_fn, prior_mean, s, k, delta, delta_mc, data_sets, row_dir):
  """Fits a posterior around `prior_mean` (prior scale s) and certifies it; one bound row.
  Resumes from ROW_DIR: the fitted posterior (posterior.npz) and the Monte Carlo partial sums
  (mc.json, after every round)."""
  import jax
  import jax.numpy as jnp

  (xf, yf), (xb, yb), (xt, yt) = data_sets
  primary = distributed.is_primary()
  if primary:
    os.makedirs(row_dir, exist_ok=True)
  saved = os.path.join(row_dir, 'posterior.npz')
  leaves, treedef = jax.tree.flatten(prior_mean)
  t0 = time.time()
  if config.posterior_steps == 0:  # the prior itself: KL 0, no fit
    mean, sigma, objective = (
      prior_mean,
      jax.tree.map(lambda t: np.full_like(t, s), prior_mean),
      None,
    )
  elif os.path.exists(saved):
    with np.load(saved) as f:
      mean = jax.tree.unflatten(treedef, [f[f'mean{i}'] for i in range(len(leaves))])
      sigma = jax.tree.unflatten(treedef, [f[f'sigma{i}'] for i in range(len(leaves))])
      objective = float(f['objective'])
  else:
    # Data as jit arguments: closed-over arrays would be constant-folded (minutes on MNIST).
    fit = jax.jit(
      lambda p, k, x, y: posterior.fit_posterior(
        apply_fn, p, s, x, y, key=k, m=int(xb.shape[0]), delta=delta,
        steps=config.posterior_steps, learning_rate=config.posterior_lr,
      )
    )  # fmt: skip
    mean, sigma, objective = jax.device_get(fit(prior_mean, k, xf, yf))
    objective = float(objective)
    if primary:
      arrays = {f'mean{i}': a for i, a in enumerate(jax.tree.leaves(mean))}
      arrays |= {f'sigma{i}': a for i, a in enumerate(jax.tree.leaves(sigma))}
      workdir.write_npz(saved, objective=np.float64(objective), **arrays)
  fit_seconds = time.time() - t0
  logits_fn = posterior.local_reparam_logits(model)
  mc_path = os.path.join(row_dir, 'mc.json')
  sums = None
  if os.path.exists(mc_path):
    with open(mc_path) as f:
      sums = posterior.MCSums(**json.load(f))
  while sums is None or sums.rounds < config.mc_rounds:
    sums = posterior.mc_error_sums(logits_fn, mean, sigma, xb, yb, key=jax.random.fold_in(k, 1),
                                   rounds=1, sums=sums)  # fmt: skip
    if primary:
      workdir.write_json(mc_path, sums._asdict())
  kl = pac_bayes.gaussian_kl(mean, sigma, prior_mean, s)
  m = int(xb.shape[0])
  cert = pac_bayes.mc_certificate_from_counts(sums.errors, sums.draws, kl, m, delta, delta_mc)
  test = posterior.mc_error_sums(logits_fn, mean, sigma, xt, yt, key=jax.random.fold_in(k, 2),
                                 rounds=config.mc_rounds)  # fmt: skip
  row = {**cert._asdict(), 'objective': objective, 'mc_rounds': sums.rounds}
  row['kl_term'] = pac_bayes.complexity(kl, m, delta)  # (KL + ln(2 sqrt(m) / delta)) / m
  row['mc_draws_per_second'] = sums.draws / max(sums.seconds, 1e-9)
  # What other round counts would give at this sampled error: the sampling bound's upper end.
  row['sampling_tightness'] = {
    str(r): pac_bayes.mc_certificate_from_counts(
      round(cert.emp_mean * r * m), r * m, kl, m, delta, delta_mc).emp_upper
    for r in sorted({1, 10, 100, sums.rounds})
  }  # fmt: skip
  row['stochastic_test_error'] = test.errors / test.draws
  row['mean_test_error'] = float(jnp.mean(jnp.argmax(apply_fn(mean, xt), -1) != yt))
  row['fit_seconds'] = fit_seconds
  return row


def bound(
  config: Config, train, test, path: str, log: Callable[[str], None] = workdir.print_flushed
) -> dict:
  """The PAC-Bayes bounds: a prior (trained in PATH/prior on `prior_fraction` of the training
  set, or the initialisation) at every prior scale, certified on the rest (union bound)."""
  import jax
  import jax.numpy as jnp

  (xtr, ytr), (xte, yte) = train, test
  perm = np.random.default_rng(config.seed).permutation(len(ytr))
  n_prior = int(len(ytr) * config.prior_fraction)
  prior_idx, bound_idx = perm[:n_prior], perm[n_prior:]
  # Dropout acts in the prior's training only: the posterior's networks are the plain MLP.
  model = models.MLP(int(ytr.max()) + 1, tuple(int(h) for h in config.bound_hidden),
                     dropout=config.prior_dropout)  # fmt: skip
  apply_fn = lambda p, x: model.apply({'params': p}, x)  # noqa: E731
  train_config = train_lib.TrainConfig(
    steps=config.prior_steps, batch_size=128, optimizer='sgd', learning_rate=config.prior_lr,
    schedule='cosine', seed=config.seed, log_every=max(config.prior_steps // 4, 1),
    checkpoint_every=config.prior_steps,
  )  # fmt: skip
  init = train_lib.create_state(model, train_config, xtr.shape[1:])[0].params
  # The prior is trained data-parallel over every device (of every process in a multi-process
  # job); the posteriors are then fitted and certified alike on every process (0 writes).
  mesh = data.data_mesh() if jax.device_count() > 1 else None
  prior = train_lib.train(
    model, train_config, xtr[prior_idx], ytr[prior_idx], os.path.join(path, 'prior'),
    mesh=mesh, log=log,
  )  # fmt: skip
  prior = jax.device_get(prior.params)
  bound_data = jnp.asarray(xtr[bound_idx]), jnp.asarray(ytr[bound_idx])
  fit_data = (jnp.asarray(xtr), jnp.asarray(ytr)) if config.posterior_on_all else bound_data
  test_data = jnp.asarray(xte), jnp.asarray(yte)
  sigmas = [float(s) for s in config.prior_sigmas]
  priors = [('held_out_data', prior)] + ([('initialisation', init)] if config.init_prior else [])
  delta = pac_bayes.union_delta(config.delta, len(priors) * len(sigmas))  # every prior, scale
  delta_mc = pac_bayes.union_delta(config.delta_mc, len(priors) * len(sigmas))
  out = {'m': len(bound_idx), 'prior_examples': n_prior, 'delta': config.delta}
  out['delta_mc'], out['rows'] = config.delta_mc, []
  key = jax.random.key(config.seed)
  for prior_name, prior_mean in priors:
    for i, s in enumerate(sigmas):
      k = jax.random.fold_in(key, 2 * i + (prior_name == 'initialisation'))
      t0 = time.time()
      row_dir = os.path.join(path, 'bound', f'{prior_name}_sigma{s:g}')
      cert = _certify(config, model, apply_fn, prior_mean, s, k, delta, delta_mc,
                      (fit_data, bound_data, test_data), row_dir)  # fmt: skip
      row = {'prior': prior_name, 'prior_sigma': s, **cert, 'seconds': time.time() - t0}
      out['rows'].append(row)
      log(
        f'bound ({prior_name} prior, sigma {s:g}): {cert["bound"]:.4f} '
        f'(sampled error {cert["emp_mean"]:.4f} <= {cert["emp_upper"]:.4f} from '
        f'{cert["samples"]} draws at {cert["mc_draws_per_second"]:.0f}/s, KL {cert["kl"]:.1f}; '
        f"stochastic test error {row['stochastic_test_error']:.4f}, mean network's "
        f'{row["mean_test_error"]:.4f})'
      )
  for prior_name, _ in priors:
    rows = [r for r in out['rows'] if r['prior'] == prior_name]
    out[f'best_{prior_name}'] = min(rows, key=lambda r: r['bound'])
  out['confidence'] = 1 - config.delta - config.delta_mc
  return out


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

  `cli`: name settings as flags ('--widths') in messages, as the launcher does.

  Raises:
    workdir.WorkdirMismatch: `path` holds another experiment, configuration or data (nothing
      touched). InvalidInput, CheckpointMismatch: as `train_lib.train` (a diverged zoo model is
      recorded as such; a diverged prior raises TrainingDiverged).
  """
  from tsuzuku_jax import plotting  # matplotlib: only when an experiment runs

  train, test = (data.load(config.dataset, s) for s in ('train', 'test'))
  identity = data.identity(config.dataset, train=train, test=test)
  record = dataclasses.asdict(config)
  if workdir.claim_experiment(path, 'flatness', record, identity, neutral=NEUTRAL,
                              overwrite=overwrite, cli=cli, log=log):  # fmt: skip
    return None
  results_path = os.path.join(path, 'results.json')
  results = {'dataset': config.dataset, 'config': dataclasses.asdict(config)}
  if config.zoo:
    summary, plot = zoo.analyse(zoo.train_zoo(config, train, test, path, log))
    if distributed.is_primary():  # one writer of the shared files in a multi-process job
      plotting.plot_measure_scatter(
        plot['panels'], os.path.join(path, 'flatness.png'), colors=plot['colors'],
        color_label='label noise', title=f'{config.dataset}: {plot["models"]} models',
      )  # fmt: skip
    results['zoo'] = summary
    log(f'zoo: {summary["converged"]}/{summary["models"]} converged')
    for m in (*measures.RAW_MEASURES, *measures.NORMALIZED_MEASURES):
      t = summary['tau'][m]['converged'] or summary['tau'][m]['all']
      log(f'  {m:24s} tau {t["tau"]:+.3f} psi {t["granulated"]["psi"]:+.3f}')
  if config.bound:
    results['bound'] = bound(config, train, test, path, log)
  if distributed.is_primary():
    workdir.write_json(results_path, {'experiment': 'flatness', **results})
  log(f'wrote {results_path}')
  return results
