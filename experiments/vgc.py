r"""Data-parallel training with compressed gradient exchange (VGC and baselines), from flags.

  python experiments/vgc.py --flagfile=experiments/configs/vgc_digits.flags --workdir=runs/vgc

Trains one model per (method, seed) on all devices of the mesh (one worker per device), or on
--workers simulated workers on one device (--simulate), and writes WORKDIR/<method>/seed<k>.json
(skipped when it exists: an interrupted sweep resumes where it stopped), WORKDIR/results.json
(accuracy, cumulative compression ratios, density, overflow, modelled speedups per method), and
WORKDIR/accuracy_vs_compression.png. WORKDIR/run.json records the run: a later invocation
resumes only the same flags, data and number of workers (see experiments/common.py).
"""

import dataclasses
import json
import os

import common
import numpy as np
from absl import app, flags

from tsuzuku_jax import data, models, plotting, workdir
from tsuzuku_jax.vgc import compression, cost_model
from tsuzuku_jax.vgc import data_parallel as dp

_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'digits | mnist | cifar10 | npz:PATH.')
_MODEL = flags.DEFINE_enum('model', 'mlp', ['mlp', 'cnn'], 'Architecture (no batch norm).')
_HIDDEN = flags.DEFINE_list('hidden', ['256'], 'MLP hidden widths.')
_CHANNELS = flags.DEFINE_list('channels', ['32', '64'], 'CNN channels per stage.')
_DENSE = flags.DEFINE_integer('dense', 128, 'CNN dense width.')
_METHODS = flags.DEFINE_list('methods', ['dense', 'vgc'], f'Any of {compression.METHODS}.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (model init and data order).')
_ALPHA = flags.DEFINE_float('alpha', 2.0, 'vgc/hybrid: send when r^2 > alpha v.')
_ZETA = flags.DEFINE_float('zeta', 0.999, 'vgc/hybrid: decay of v for unsent elements.')
_TAU = flags.DEFINE_float('tau', 0.01, 'strom/hybrid: threshold on |r|.')
_DENSITY = flags.DEFINE_float('density', 0.001, 'topk: fraction sent per tensor.')
_CAPACITY = flags.DEFINE_float('capacity', 0.05, 'vgc/strom/hybrid: slots per tensor (fraction).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'default', ['default', 'true', 'false'], '4-bit codes.')
_ESTIMATOR = flags.DEFINE_enum('estimator', 'cheap', ['cheap', 'microbatch', 'per_example'], '')
_MICRO = flags.DEFINE_integer('microbatches', 4, 'Micro-batches of the microbatch estimator.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Workers (0: one per device).')
_SIMULATE = flags.DEFINE_bool('simulate', False, 'Run the workers as a vmap on one device.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_LR = flags.DEFINE_float('learning_rate', 0.05, 'Peak learning rate (SGD).')
_SCHEDULE = flags.DEFINE_enum('schedule', 'cosine', ['cosine', 'constant'], 'LR schedule.')
_MOMENTUM = flags.DEFINE_float('momentum', 0.9, 'Heavy-ball momentum.')
_MOMENTUM_ON = flags.DEFINE_enum('momentum_on', 'update', ['update', 'worker'], 'Where.')
_WD = flags.DEFINE_float('weight_decay', 0.0, 'Weight decay.')
_WD_ON = flags.DEFINE_enum('weight_decay_on', 'update', ['update', 'gradient'], 'Where.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 100, 'Steps between test evaluations.')
_REF_PARAMS = flags.DEFINE_float('reference_params', 25e6, 'Model size of the speedup model.')
_REF_T = flags.DEFINE_float('reference_t_compute_ms', 85.0, 'ASSUMED step compute time there.')
_REF_BW = flags.DEFINE_float('reference_memory_gbs', 3350.0, 'ASSUMED memory bandwidth there.')
_REF_FLOOR = flags.DEFINE_float('reference_compress_over_floor', 1.5, 'ASSUMED compress/floor.')


def _validate() -> list[int]:
  common.check_workdir()
  try:
    data.validate_name(_DATASET.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  for m in _METHODS.value:
    if m not in compression.METHODS:
      raise app.UsageError(f'--methods: unknown method {m!r}; choose from {compression.METHODS}')
  for name, flag in (('hidden', _HIDDEN), ('channels', _CHANNELS), ('seeds', _SEEDS)):
    if not flag.value or not all(v.isdigit() for v in flag.value):
      raise app.UsageError(f'--{name} must be non-negative integers, got {flag.value}')
  try:
    _config('vgc', 0, max(_WORKERS.value, 1))
    for m in _METHODS.value:
      _config(m, 0, max(_WORKERS.value, 1))
  except ValueError as e:
    raise app.UsageError(f'bad parameter: {e}') from None
  if _WORKERS.value < 0:
    raise app.UsageError(f'--workers must be >= 0, got {_WORKERS.value}')
  return [int(s) for s in _SEEDS.value]


def _config(method: str, seed: int, workers: int) -> dp.DPConfig:
  quantize = {'default': None, 'true': True, 'false': False}[_QUANTIZE.value]
  return dp.DPConfig(
    method=method,
    alpha=_ALPHA.value,
    zeta=_ZETA.value,
    tau=_TAU.value,
    density=_DENSITY.value,
    capacity=_CAPACITY.value,
    quantize=quantize,
    estimator=_ESTIMATOR.value,
    microbatches=_MICRO.value,
    workers=workers,
    simulate=_SIMULATE.value,
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    learning_rate=_LR.value,
    schedule=_SCHEDULE.value,
    momentum=_MOMENTUM.value,
    momentum_on=_MOMENTUM_ON.value,
    weight_decay=_WD.value,
    weight_decay_on=_WD_ON.value,
    seed=seed,
    eval_every=_EVAL_EVERY.value,
  )


def _model(num_classes):
  if _MODEL.value == 'mlp':
    return models.MLP(num_classes, hidden=tuple(int(h) for h in _HIDDEN.value))
  ch = tuple(int(c) for c in _CHANNELS.value)
  return models.CNN(num_classes, ch, _DENSE.value, batch_norm=False)


def main(argv):
  del argv
  seeds = _validate()
  import jax
  import jax.numpy as jnp
  import optax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  workers = _WORKERS.value or jax.device_count()
  if not _SIMULATE.value and workers != jax.device_count():
    raise app.UsageError(
      f'--workers={workers} but there are {jax.device_count()} devices: use --simulate'
    )
  if _BATCH.value % workers:
    raise app.UsageError(f'--batch_size={_BATCH.value} is not divisible by {workers} workers')
  train, test = (data.load(_DATASET.value, s) for s in ('train', 'test'))
  identity = data.identity(_DATASET.value, train=train, test=test)
  if common.open_workdir('vgc', identity, extra={'workers_resolved': workers}):
    return
  model = _model(data.num_classes(train[1]))
  apply_fn = lambda p, x: model.apply({'params': p}, x)

  def loss_fn(p, b):
    logits = apply_fn(p, b['image'])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b['label']))
    return loss, jnp.mean(jnp.argmax(logits, -1) == b['label'])

  results = {'flags': common.config(), 'workers': workers, 'methods': {}}
  results['device'] = jax.devices()[0].device_kind
  curves, points = {}, {}
  for method in _METHODS.value:
    runs = []
    for seed in seeds:
      path = os.path.join(_WORKDIR.value, method, f'seed{seed}.json')
      config = _config(method, seed, workers)
      if os.path.exists(path):
        with open(path) as f:
          run = json.load(f)
        if run['config'] != workdir.normalize(config.__dict__):
          raise workdir.WorkdirMismatch(
            f'--workdir: {path} was written with other settings; use a new --workdir'
          )
        print(f'{method} seed {seed}: done before ({path})', flush=True)
      else:
        params = model.init(jax.random.key(seed), train[0][:1])['params']
        try:
          _, hist = dp.train(loss_fn, apply_fn, params, config, train, test)
        except FloatingPointError as e:
          print(f'error: {e}; recorded as diverged', flush=True)
          workdir.write_json(path, {'config': config.__dict__, 'diverged': str(e)})
          continue
        local = {'image': train[0][: config.batch_size // workers]}
        local['label'] = train[1][: config.batch_size // workers]
        times = cost_model.measure_worker_times(loss_fn, params, local, config)
        run = {'config': config.__dict__, 'history': hist, 'times': times}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        workdir.write_json(path, run)
      runs.append(run)
    diverged = [r['diverged'] for r in runs if 'diverged' in r]
    runs = [r for r in runs if 'diverged' not in r]
    if not runs:
      results['methods'][method] = {'diverged': diverged}
      continue
    results['methods'][method] = {**_summarise(runs, workers), 'diverged': diverged}
    h = runs[0]['history']
    curves[method] = (h['ratio_ideal'], h['test_accuracy'])
    points[method] = ([r['history']['ratio_ideal'][-1] for r in runs],)
    points[method] += ([r['history']['test_accuracy'][-1] for r in runs],)
    s = results['methods'][method]
    print(
      f'== {method}: test acc {s["accuracy_mean"]:.4f} +- {s["accuracy_std"]:.4f} '
      f'bytes ratio {s["ratio_ideal"]:.1f}x (static {s["ratio_static"]:.1f}x) '
      f'elements {s["ratio_elements"]:.1f}x overflow {s["overflow_total"]:.0f}',
      flush=True,
    )
  plotting.plot_accuracy_vs_compression(
    curves,
    points,
    os.path.join(_WORKDIR.value, 'accuracy_vs_compression.png'),
    title=_DATASET.value,
  )
  common.write_results('vgc', results)


def _summarise(runs: list[dict], workers: int) -> dict:
  hist = [r['history'] for r in runs]
  acc = [h['test_accuracy'][-1] for h in hist]
  tot = [h['totals'] for h in hist]
  steps = len(hist[0]['density'])
  dense = np.mean([t['dense_bytes'] for t in tot]) / steps
  ideal = np.mean([t['ideal_bytes'] for t in tot]) / steps
  static = np.mean([t['static_bytes'] for t in tot]) / steps
  times = {k: float(np.median([r['times'][k] for r in runs])) for k in runs[0]['times']}
  # The reference model (a 25M-parameter network on an accelerator): compute time, memory
  # bandwidth and compress-over-floor factor are ASSUMED (flags); the compression ratio and
  # the variance estimate's relative cost are the ones measured here.
  ref_d = _REF_PARAMS.value
  ref_t = _REF_T.value / 1e3
  ref_compress = 24 * ref_d / (_REF_BW.value * 1e9) * _REF_FLOOR.value
  ref_var = ref_t * times['t_variance'] / max(times['t_compute'], 1e-12)
  speedups = {}
  if runs[0]['config']['method'] != 'dense':
    for name, sent in (('ideal', ideal), ('static', static)):
      own = cost_model.StepModel(dense, sent, workers, **times)
      ref = cost_model.StepModel(4 * ref_d, 4 * ref_d * sent / dense, workers, ref_t)
      ref = dataclasses.replace(ref, t_compress=ref_compress, t_variance=ref_var)
      speedups[f'this_model_{name}'] = cost_model.speedup_table(own)
      speedups[f'reference_model_{name}'] = cost_model.speedup_table(ref)
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
    'speedup': speedups,  # this model (measured times) and the ASSUMED reference model
  }


if __name__ == '__main__':
  common.run(main)
