"""The VGC experiment: one data-parallel training per (method, seed) with a compressed gradient
exchange, the byte and accuracy summary, and the modelled speed-ups; `run(Config(...),
workdir)` from a notebook, or `experiments/vgc.py` from flags.

Each run trains on all devices (one worker per device), or on `workers` simulated workers on
one device (`simulate`), in WORKDIR/<method>/seed<k>/ (orbax checkpoints, metrics.jsonl,
TensorBoard scalars: an interrupted training resumes from its last checkpoint), then writes
WORKDIR/<method>/seed<k>.json (read back when it exists), WORKDIR/results.json (accuracy, cumulative
compression ratios, density, overflow, modelled speed-ups per method) and
WORKDIR/accuracy_vs_compression.png. WORKDIR/run.json records the run: a later call resumes
only the same configuration, data and number of workers.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax import checks, data, distributed, models, train_lib, workdir
from tsuzuku_jax.vgc import compression, cost_model, variance
from tsuzuku_jax.vgc import data_parallel as dp

NEUTRAL = ('eval_every', 'checkpoint_every', 'overwrite', 'workdir')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a VGC sweep (the launcher's flags, one field each; a field's
  comment is its flag's help)."""

  CHOICES: ClassVar[dict] = dict(
    model=('mlp', 'cnn'), estimator=variance.ESTIMATORS, schedule=('cosine', 'constant'),
    momentum_on=('update', 'worker'), weight_decay_on=('update', 'gradient'),
  )  # fmt: skip

  dataset: str = 'digits'  # digits | mnist | cifar10 | npz:PATH
  model: str = 'mlp'  # architecture (no batch norm)
  hidden: tuple[int, ...] = (256,)  # MLP hidden widths
  channels: tuple[int, ...] = (32, 64)  # CNN channels per stage
  dense: int = 128  # CNN dense width
  methods: tuple[str, ...] = ('dense', 'vgc')  # any of dense, vgc, strom, hybrid, topk
  seeds: tuple[int, ...] = (0,)  # seeds (model initialisation and data order)
  alpha: float = 2.0  # vgc/hybrid: send when r^2 > alpha v
  zeta: float = 0.999  # vgc/hybrid: decay of v for unsent elements
  tau: float = 0.01  # strom/hybrid: threshold on |r|
  density: float = 0.001  # topk: fraction sent per tensor
  capacity: float = 0.05  # vgc/strom/hybrid: slots per tensor (fraction)
  quantize: bool | None = None  # 4-bit codes (None, 'default': the method's own choice)
  estimator: str = 'cheap'  # variance estimator
  microbatches: int = 4  # micro-batches of the microbatch estimator
  workers: int = 0  # workers (0: one per device)
  simulate: bool = False  # run the workers as a vmap on one device
  steps: int = 2000  # training steps
  batch_size: int = 128  # global batch size
  learning_rate: float = 0.05  # peak learning rate (SGD)
  schedule: str = 'cosine'  # learning-rate schedule
  momentum: float = 0.9  # heavy-ball momentum
  momentum_on: str = 'update'  # where momentum acts: on the mean update or on each worker
  weight_decay: float = 0.0  # weight decay
  weight_decay_on: str = 'update'  # where weight decay acts: update or gradient
  eval_every: int = 100  # steps between test evaluations
  checkpoint_every: int = 500  # orbax checkpoints of each training (it resumes inside)
  # The speed-up model's reference network (ASSUMED accelerator figures, not measured here).
  reference_params: float = 25e6  # the speed-up model's reference network: parameters
  reference_t_compute_ms: float = 85.0  # ASSUMED step time there (ms)
  reference_memory_gbs: float = 3350.0  # ASSUMED memory bandwidth (GB/s)
  reference_compress_over_floor: float = 1.5  # ASSUMED compress time / memory floor

  def __post_init__(self):
    """One message per bad field, naming it (the launcher prefixes '--')."""
    for m in self.methods:
      if m not in compression.METHODS:
        raise ValueError(f'methods: unknown method {m!r}; choose from {compression.METHODS}')
    checks_ = [
      (self.model in ('mlp', 'cnn'), f"model must be 'mlp' or 'cnn', got {self.model!r}"),
      (bool(self.methods), 'methods must name at least one method'),
      (bool(self.seeds) and all(s >= 0 for s in self.seeds),
       f'seeds must be non-negative integers, got {self.seeds}'),
      (all(h > 0 for h in self.hidden), f'hidden must be positive integers, got {self.hidden}'),
      (all(c > 0 for c in self.channels),
       f'channels must be positive integers, got {self.channels}'),
      (self.workers >= 0, f'workers must be >= 0, got {self.workers}'),
    ]  # fmt: skip
    for ok, msg in checks_:
      if not ok:
        raise ValueError(msg)
    for m in ('vgc', *self.methods):  # alpha, zeta, ... batch_size against the workers
      self.run_config(m, 0, max(self.workers, 1))

  def run_config(self, method: str, seed: int, workers: int) -> dp.DPConfig:
    names = {f.name for f in dataclasses.fields(dp.DPConfig)} - {'method', 'seed', 'workers'}
    return dp.DPConfig(
      method=method, seed=seed, workers=workers, **{n: getattr(self, n) for n in names}
    )


def build_model(config: Config, num_classes: int):
  if config.model == 'mlp':
    return models.MLP(num_classes, hidden=tuple(config.hidden))
  return models.CNN(num_classes, tuple(config.channels), config.dense, batch_norm=False)


def _one_run(config, method, seed, workers, model, train, test, path, log) -> dict:
  """One (method, seed) training, or its record read back; a divergence is recorded."""
  dpc = config.run_config(method, seed, workers)
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    ours = {k: v for k, v in workdir.normalize(dpc.__dict__).items() if k not in NEUTRAL}
    if {k: v for k, v in record['config'].items() if k not in NEUTRAL} != ours:
      raise workdir.WorkdirMismatch(
        f'workdir: {path} was written with other settings; use a new workdir'
      )
    log(f'{method} seed {seed}: done before ({path})')
    return record
  apply_fn = lambda p, x: model.apply({'params': p}, x)  # noqa: E731

  def loss_fn(p, b):
    logits = apply_fn(p, b['image'])
    loss = train_lib.cross_entropy(logits, b['label'])
    return loss, jnp.mean(jnp.argmax(logits, -1) == b['label'])

  params = model.init(jax.random.key(seed), train[0][:1])['params']
  try:
    run_dir = path.removesuffix('.json')  # checkpoints, metrics.jsonl, tensorboard/
    _, hist = dp.train(loss_fn, apply_fn, params, dpc, train, test, workdir=run_dir, log=log)
  except FloatingPointError as e:
    log(f'error: {e}; recorded as diverged')
    record = {'config': dpc.__dict__, 'diverged': str(e)}
  else:
    local = {'image': train[0][: dpc.batch_size // workers]}
    local['label'] = train[1][: dpc.batch_size // workers]
    times = cost_model.measure_worker_times(loss_fn, params, local, dpc)
    record = {'config': dpc.__dict__, 'history': hist, 'times': times}
  if distributed.is_primary():  # one writer of the shared files in a multi-process job
    os.makedirs(os.path.dirname(path), exist_ok=True)
    workdir.write_json(path, record)
  return record


def run(
  config: Config,
  path: str,
  *,
  overwrite: bool = False,
  log: Callable[[str], None] = workdir.print_flushed,
  cli: bool = False,
) -> dict | None:
  """Runs (or resumes, or finds complete) the sweep in `path`; returns the results dict (None
  when `path` already holds this run complete).

  Raises:
    InvalidInput: `workers` does not match the devices without `simulate`, `simulate` in a
      multi-process job, or `batch_size` does not split over the workers.
    WorkdirMismatch: `path` holds another run.
  """
  from tsuzuku_jax import plotting  # matplotlib: only when an experiment runs

  pre = '--' if cli else ''
  if config.simulate and jax.process_count() > 1:
    raise checks.InvalidInput(
      f'{pre}simulate runs every worker on one device of each process; in a job of '
      f'{jax.process_count()} processes use {pre}nosimulate and {pre}workers=0 (one per device)'
    )
  workers = config.workers or jax.device_count()
  if not config.simulate and workers != jax.device_count():
    raise checks.InvalidInput(
      f'{pre}workers={workers} but there are {jax.device_count()} devices: use {pre}simulate'
    )
  if config.batch_size % workers:
    raise checks.InvalidInput(
      f'{pre}batch_size={config.batch_size} is not divisible by {workers} workers'
    )
  train, test = (data.load(config.dataset, s) for s in ('train', 'test'))
  identity = data.identity(config.dataset, train=train, test=test)
  record = {**dataclasses.asdict(config), 'workers_resolved': workers}
  if workdir.claim_experiment(path, 'vgc', record, identity, neutral=NEUTRAL,
                              overwrite=overwrite, cli=cli, log=log):  # fmt: skip
    return None
  results_path = os.path.join(path, 'results.json')
  model = build_model(config, data.num_classes(train[1]))
  results = {'config': dataclasses.asdict(config), 'workers': workers, 'methods': {}}
  results['device'] = jax.devices()[0].device_kind
  curves, points = {}, {}
  for method in config.methods:
    runs = [
      _one_run(config, method, seed, workers, model, train, test,
               os.path.join(path, method, f'seed{seed}.json'), log)
      for seed in config.seeds
    ]  # fmt: skip
    diverged = [r['diverged'] for r in runs if 'diverged' in r]
    runs = [r for r in runs if 'diverged' not in r]
    if not runs:
      results['methods'][method] = {'diverged': diverged}
      continue
    s = {**summarise(runs, workers, config), 'diverged': diverged}
    results['methods'][method] = s
    curves[method] = (runs[0]['history']['ratio_ideal'], runs[0]['history']['test_accuracy'])
    points[method] = ([r['history']['ratio_ideal'][-1] for r in runs],)
    points[method] += ([r['history']['test_accuracy'][-1] for r in runs],)
    log(
      f'== {method}: test acc {s["accuracy_mean"]:.4f} +- {s["accuracy_std"]:.4f} '
      f'bytes ratio {s["ratio_ideal"]:.1f}x (static {s["ratio_static"]:.1f}x) '
      f'elements {s["ratio_elements"]:.1f}x overflow {s["overflow_total"]:.0f}'
    )
  if distributed.is_primary():
    plotting.plot_accuracy_vs_compression(
      curves, points, os.path.join(path, 'accuracy_vs_compression.png'), title=config.dataset
    )
    workdir.write_json(results_path, {'experiment': 'vgc', **results})
  log(f'wrote {results_path}')
  return results


def _speedups(runs: list[dict], workers: int, config: Config, sizes: dict, times: dict) -> dict:
  # The reference model (a 25M-parameter network on an accelerator): compute time, memory
  # bandwidth and compress-over-floor factor are ASSUMED (config); the compression ratio and
  # the variance estimate's relative cost are the ones measured here.
  ref_d = config.reference_params
  ref_t = config.reference_t_compute_ms / 1e3
  ref_compress = 24 * ref_d / (config.reference_memory_gbs * 1e9)
  ref_compress *= config.reference_compress_over_floor
  ref_var = ref_t * times['t_variance'] / max(times['t_compute'], 1e-12)
  speedups = {}
  if runs[0]['config']['method'] != 'dense':
    dense = sizes['dense']
    for name in ('ideal', 'static'):
      own = cost_model.StepModel(dense, sizes[name], workers, **times)
      ref = cost_model.StepModel(4 * ref_d, 4 * ref_d * sizes[name] / dense, workers, ref_t)
      ref = dataclasses.replace(ref, t_compress=ref_compress, t_variance=ref_var)
      speedups[f'this_model_{name}'] = cost_model.speedup_table(own)
      speedups[f'reference_model_{name}'] = cost_model.speedup_table(ref)
  return speedups


def summarise(runs: list[dict], workers: int, config: Config) -> dict:
  """Accuracy, byte and element ratios, density, overflow and modelled speed-ups of the seeds
  of one method."""
  hist = [r['history'] for r in runs]
  acc = [h['test_accuracy'][-1] for h in hist]
  tot = [h['totals'] for h in hist]
  steps = len(hist[0]['density'])
  sizes = {k: np.mean([t[f'{k}_bytes'] for t in tot]) / steps for k in ('dense', 'ideal', 'static')}
  times = {k: float(np.median([r['times'][k] for r in runs])) for k in runs[0]['times']}
  return {
    'accuracy': acc,
    'accuracy_mean': float(np.mean(acc)),
    'accuracy_std': float(np.std(acc)),
    'ratio_ideal': float(np.mean([t['dense_bytes'] / t['ideal_bytes'] for t in tot])),
    'ratio_static': float(np.mean([t['dense_bytes'] / t['static_bytes'] for t in tot])),
    'ratio_elements': float(np.mean([t['elements'] / max(t['sent'], 1) for t in tot])),
    'density_mean': float(np.mean([np.mean(h['density']) for h in hist])),
    'density_last_10pct': float(
      np.mean([np.mean(h['density'][-max(steps // 10, 1) :]) for h in hist])
    ),
    'overflow_total': float(np.mean([t['overflow'] for t in tot])),
    'density_per_step': np.mean([h['density'] for h in hist], 0).tolist(),  # mean over seeds
    'times': times,
    # This model (measured times) and the ASSUMED reference model.
    'speedup': _speedups(runs, workers, config, sizes, times),
  }
