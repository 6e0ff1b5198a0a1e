r"""LMT benchmark: what the Lipschitz bound costs in training and certification; soundness check.

  PYTHONPATH=. python benchmarks/lmt_bench.py --out=benchmarks/results/lmt_bench_cpu.json

One call, per model (MLP on 8x8x1, the small CNN on 28x28x1, WRN-16-4 on 32x32x3; synthetic
random data, so no dataset and no tensorflow_datasets are needed):

1. Correctness (first; the benchmark refuses to report if it fails): after a few LMT training
   steps, the sound certificate (`lmt.certificate`, the jaxpr analysis) must be >= the converged
   power-iteration estimate (a lower bound on the true norm) for every linear segment
   (`lmt.segment_report`) and for the network's pairwise bounds (`lmt.estimate` iterated to
   convergence), up to a relative 1e-5. A segment whose certificate is more than 5 % above its
   converged value gets a WARNING line (a loose, but still sound, bound).
2. Train step: `train_lib.make_train_step` with cross-entropy (no bound work)
   versus c > 0 (LMT, pairwise form, one power-iteration step per segment) and, where cheap, the
   GloRo loss; same model, batch and optimiser. Compilation is excluded; the variants are
   interleaved (rotating order) over many short repeats so that load drift hits all of them
   alike; each repeat is the mean time of K steps ending in `jax.block_until_ready`. The ratio
   quoted is the median over repeats of the per-repeat ratio (paired: on a shared CPU a step's
   time drifts by 30 % within a minute, more than the overhead measured); the ratio of the
   median times is printed beside it.
3. Certification: the one-off time of `lmt.certificate` (tracing, interpretation and host
   float64 bounds: the analysis time), and the
   per-example throughput of certification (eval logits + `lmt.certified_radius`, at 'highest'
   matmul precision, as a certificate needs) versus plain inference (eval logits + argmax) on the
   same batch.

Ratios are the numbers to quote; absolute times only with the device line printed above them.
The JSON (`--out`) holds the device, the settings, every repeat's time and every ratio.

On a CPU, a WRN-16-4 step at batch 128 takes about 5 s, so unless told otherwise WRN runs there
with 5 repeats of 1 step and without the GloRo variant (`--wrn_*`, `--gloro`); the estimate's
cost is per step, not per example, so a smaller batch shows a larger ratio (1.09-1.11 at 16).
Host BLAS is limited to `--blas_threads` threads (when threadpoolctl is available): on a small
shared CPU, OpenBLAS's default threading slows the certificate's batched SVDs by an order of
magnitude.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)


from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import lmt, models, train_lib  # noqa: E402

# A certificate may sit below the converged (lower-bound) estimate by float32 rounding only.
FAIL_RTOL = 1e-5
# Per segment, certificate / converged above this is reported as a loose bound (not a failure).
WARN_RATIO = 1.05
TEST_SET = 10_000  # images, for the "certify a whole test set" estimate


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmarked model and how to time it."""

  name: str
  model: nn.Module
  input_shape: tuple[int, int, int]
  batch_size: int
  repeats: int
  steps_per_repeat: int
  variants: tuple[str, ...]  # of 'plain', 'lmt', 'gloro'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--models', default='mlp,cnn,wrn', help='Comma-separated: mlp, cnn, wrn.')
  p.add_argument('--batch_size', type=int, default=128, help='Batch of every timed step.')
  p.add_argument('--repeats', type=int, default=15, help='Timed repeats (median over them).')
  p.add_argument('--steps_per_repeat', type=int, default=2, help='Min steps (calls) per repeat.')
  p.add_argument(
    '--min_repeat_s',
    type=float,
    default=0.05,
    help='Raise the steps per repeat of cheap models so that a repeat lasts this long.',
  )
  auto = '-1: --batch_size/--repeats/--steps_per_repeat on accelerators; on CPU'
  p.add_argument('--wrn_batch_size', type=int, default=-1, help=f'{auto} 128.')
  p.add_argument('--wrn_repeats', type=int, default=-1, help=f'{auto} 5.')
  p.add_argument('--wrn_steps_per_repeat', type=int, default=-1, help=f'{auto} 1.')
  p.add_argument(
    '--gloro',
    choices=('auto', 'all', 'none'),
    default='auto',
    help='Time the GloRo loss too: all models, none, or auto (all but WRN on CPU).',
  )
  p.add_argument('--c', type=float, default=0.5, help='LMT / GloRo margin scale (c > 0).')
  p.add_argument('--check_steps', type=int, default=2, help='LMT steps before the bound check.')
  p.add_argument('--blas_threads', type=int, default=1, help='Host BLAS threads; 0: default.')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true', help='Tiny models and repeats (seconds).')
  p.add_argument(
    '--out',
    default=None,
    help='JSON path (default benchmarks/results/lmt_bench_<platform>.json; "" for none).',
  )
  args = p.parse_args(argv)
  names = [m.strip() for m in args.models.split(',') if m.strip()]
  bad = [m for m in names if m not in ('mlp', 'cnn', 'wrn')]
  if bad or not names:
    p.error(f'--models must name some of mlp, cnn, wrn; got {args.models!r}')
  args.models = names
  for flag in ('batch_size', 'repeats', 'steps_per_repeat', 'check_steps'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag} must be >= 1, got {getattr(args, flag)}')
  if args.c <= 0:
    p.error(f'--c must be positive, got {args.c}')
  return args


def model_specs(args: argparse.Namespace, platform_name: str) -> list[Spec]:
  on_cpu = platform_name == 'cpu'

  def pick(value, cpu_default, other):
    return value if value > 0 else (cpu_default if on_cpu else other)

  def variants(heavy: bool) -> tuple[str, ...]:
    with_gloro = {'all': True, 'none': False}.get(args.gloro, not (heavy and on_cpu))
    return ('plain', 'lmt', 'gloro') if with_gloro else ('plain', 'lmt')

  b, r, k = args.batch_size, args.repeats, args.steps_per_repeat
  if args.smoke:
    table = {
      'mlp': (models.MLP(hidden=(32,)), (8, 8, 1), 8, 2, 2, variants(False)),
      'cnn': (models.CNN(channels=(4, 8), dense=16), (12, 12, 1), 8, 2, 2, variants(False)),
      'wrn': (models.WideResNet(depth=10, width=1), (8, 8, 3), 4, 2, 1, ('plain', 'lmt')),
    }
  else:
    wrn = (
      models.WideResNet(),
      (32, 32, 3),
      pick(args.wrn_batch_size, 128, b),
      pick(args.wrn_repeats, 5, r),
      pick(args.wrn_steps_per_repeat, 1, k),
      variants(True),
    )
    table = {
      'mlp': (models.MLP(), (8, 8, 1), b, r, k, variants(False)),
      'cnn': (models.CNN(), (28, 28, 1), b, r, k, variants(False)),
      'wrn': wrn,
    }
  return [Spec(name, *table[name]) for name in args.models]


def blas_limit(threads: int):
  """Context limiting host BLAS threads (a no-op when threads <= 0 or threadpoolctl is absent)."""
  if threads <= 0:
    return contextlib.nullcontext(), 'default'
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    return contextlib.nullcontext(), 'default (threadpoolctl not installed)'
  return threadpool_limits(limits=threads, user_api='blas'), threads


def check_bounds(apply_fn, variables, shape, cert: lmt.Certificate, iterates) -> tuple[dict, bool]:
  """Certificate >= converged power iteration, per segment and for the network's pairwise
  bounds; also the 1-step training estimate (from the state's iterates) over the converged one.

  Returns (record, ok); ok is False when a sound upper bound sits below a lower bound by more
  than the float32 rounding allowance FAIL_RTOL.
  """
  failures = []
  with jax.default_matmul_precision('highest'):
    segments = lmt.segment_report(cert, key=jax.random.key(0))
    step = lambda v, it: lmt.estimate(apply_fn, v, it, shape)  # noqa: E731

    @jax.jit
    def converge(v, it):
      it = jax.lax.fori_loop(0, lmt.CONVERGED_ITERS, lambda _, it: step(v, it)[1], it)
      return step(v, it)[0]

    first = jax.jit(step)(variables, iterates)[0]
    est = converge(variables, iterates)
  for i, row in enumerate(segments):
    if row['certificate'] < row['converged'] * (1 - FAIL_RTOL):
      failures.append(f'segment {i} ({row["where"]}): certificate < power iteration')
  pc = np.asarray(cert.pairwise, np.float64)
  pv = np.asarray(est.pairwise, np.float64)
  off = ~np.eye(pc.shape[0], dtype=bool)
  if np.any(pc[off] < pv[off] * (1 - FAIL_RTOL)):
    failures.append('network pairwise bound below its converged estimate')
  ratios = [r['certificate_over_converged'] for r in segments]
  worst = int(np.argmax(ratios))
  record = {
    'ok': not failures,
    'failures': failures,
    'lipschitz_certificate': cert.lipschitz,
    'lipschitz_converged': float(est.lipschitz),
    'network_pairwise_max_certificate_over_converged': float(
      np.max(pc[off] / np.maximum(pv[off], 1e-30))
    ),
    'estimate_over_converged': float(first.lipschitz) / max(float(est.lipschitz), 1e-30),
    'max_segment_ratio': max(ratios),
    'min_segment_ratio': min(ratios),
    'loosest_segment': f'{worst}: {segments[worst]["where"].split("/")[-1]}',
    'segments_over_warn': [i for i, r in enumerate(ratios) if r > WARN_RATIO],
    'exact_segments': sum(r['exact'] for r in segments),
    'segments': segments,
  }
  return record, not failures


def _precision(fn: Callable, precision: str | None) -> Callable:
  def call(*args):
    with jax.default_matmul_precision(precision):
      return fn(*args)

  return call


def run_model(spec: Spec, args: argparse.Namespace, on_cpu: bool) -> tuple[dict, bool]:
  """Correctness check, train-step timings and certification timings of one model."""
  model, shape, b = spec.model, spec.input_shape, spec.batch_size
  t_model = time.perf_counter()
  log = lambda msg: print(f'[{spec.name} {time.perf_counter() - t_model:6.1f}s] {msg}', flush=True)
  kx, ky = jax.random.split(jax.random.key(args.seed))
  batch = {
    'image': jax.random.uniform(kx, (b, *shape), jnp.float32),
    'label': jax.random.randint(ky, (b,), 0, 10, jnp.int32),
  }
  config = train_lib.TrainConfig(batch_size=b, schedule='constant', seed=args.seed)
  apply_fn = train_lib.apply_fn(model)
  losses = {
    'plain': train_lib.CROSS_ENTROPY,
    **{v: lmt.training_loss(apply_fn, shape, c=args.c, variant=v) for v in ('lmt', 'gloro')},
  }
  inits = {v: train_lib.create_state(model, config, shape, losses[v]) for v in spec.variants}
  state0, tx = inits['plain']
  steps = {
    v: train_lib.make_train_step(model, tx, losses[v], seed=args.seed) for v in spec.variants
  }
  record = {
    'input_shape': list(shape),
    'batch_size': b,
    'params': int(sum(x.size for x in jax.tree.leaves(state0.params))),
    'repeats': spec.repeats,
    'model': repr(model),
  }

  # Warm-up: the first call compiles (its time is recorded, never used in a ratio).
  states, compile_s = {}, {}
  for v in spec.variants:
    log(f'compiling the {v} train step (batch {b})')
    (states[v], _), compile_s[v] = bu.timed(steps[v], inits[v][0], batch)

  # Correctness, on the LMT state after a few steps (moved weights, iterates, BN statistics).
  state = states['lmt']
  for _ in range(args.check_steps):
    state, metrics = steps['lmt'](state, batch)
  if not np.isfinite(float(metrics['loss'])):
    return {**record, 'correctness': {'ok': False, 'failures': ['LMT loss not finite']}}, False
  variables = train_lib.variables_of(state)
  log('certificate (jaxpr analysis, host float64 bounds)')
  with jax.default_matmul_precision('highest'):
    bounds, bounds_first_s = bu.timed(lmt.certificate, apply_fn, variables, shape)
    _, bounds_again_s = bu.timed(lmt.certificate, apply_fn, variables, shape)
  log('checking certificate >= converged (network and per segment)')
  t0 = time.perf_counter()
  record['correctness'], ok = check_bounds(apply_fn, variables, shape, bounds, state.loss_state)
  record['correctness']['check_s'] = time.perf_counter() - t0
  if not ok:
    return record, False

  # Train-step timing, variants interleaved.
  min_s = 0.0 if args.smoke else args.min_repeat_s
  k = bu.calls_per_repeat(steps['plain'], (states['plain'], batch), spec.steps_per_repeat, min_s)
  record['steps_per_repeat'] = k
  log(f'timing {", ".join(spec.variants)}: {spec.repeats} x {k} steps')
  inits = {v: (states[v], batch) for v in spec.variants}
  times = bu.interleaved_times(steps, inits, spec.repeats, k, advance=True)
  train = {v: {**bu.summary(times[v]), 'compile_and_first_step_s': compile_s[v]} for v in times}
  for v in spec.variants[1:]:
    train[v]['ratio_to_plain'] = train[v]['median_ms'] / train['plain']['median_ms']
    train[v]['ratio_to_plain_paired_median'] = statistics.median(
      a / p for a, p in zip(times[v], times['plain'], strict=True)
    )
    train[v]['ratio_to_plain_min'] = train[v]['min_ms'] / train['plain']['min_ms']
  record['train_step'] = train

  # Certification throughput versus plain inference, same batch.
  pair_lip = lmt.pairwise_bounds(bounds, 'pairwise')

  @jax.jit
  def infer(variables, x):
    return jnp.argmax(apply_fn(variables, x), -1)

  @jax.jit
  def certify(variables, x, pair_lip):
    return lmt.certified_radius(apply_fn(variables, x), pair_lip)

  fns = {'plain': _precision(infer, None), 'certify': _precision(certify, 'highest')}
  inputs = {'plain': (variables, batch['image']), 'certify': (variables, batch['image'], pair_lip)}
  if not on_cpu:  # on CPU, float32 is always computed at full precision
    fns['plain_highest'] = _precision(infer, 'highest')
    inputs['plain_highest'] = inputs['plain']
  log('timing inference and certification')
  for name, fn in fns.items():
    bu.timed(fn, *inputs[name])
  eval_repeats = max(spec.repeats, 3)
  eval_k = bu.calls_per_repeat(fns['plain'], inputs['plain'], 2 * spec.steps_per_repeat, min_s)
  times = bu.interleaved_times(fns, inputs, eval_repeats, eval_k, advance=False)
  cert = {name: bu.summary(t) for name, t in times.items()}
  cert['repeats'], cert['calls_per_repeat'] = eval_repeats, eval_k
  for name in fns:
    cert[name]['images_per_s'] = b / (cert[name]['median_ms'] / 1e3)
  cert['bounds_first_s'] = bounds_first_s
  cert['bounds_again_s'] = bounds_again_s
  cert['certify_over_plain_time'] = cert['certify']['median_ms'] / cert['plain']['median_ms']
  cert['certify_over_plain_time_paired_median'] = statistics.median(
    c / p for c, p in zip(times['certify'], times['plain'], strict=True)
  )
  if 'plain_highest' in cert:
    cert['certify_over_plain_highest_time'] = (
      cert['certify']['median_ms'] / cert['plain_highest']['median_ms']
    )
  test_set = {
    'images': TEST_SET,
    'plain_s': TEST_SET / cert['plain']['images_per_s'],
    'certify_s': bounds_first_s + TEST_SET / cert['certify']['images_per_s'],
  }
  test_set['ratio'] = test_set['certify_s'] / test_set['plain_s']
  cert['test_set_estimate'] = test_set
  record['certification'] = cert
  log('done')
  return record, True


def correctness_table(results: dict) -> str:
  rows = []
  for name, r in results.items():
    c = r['correctness']
    if 'segments' not in c:
      rows.append([name] + ['-'] * 7 + ['FAIL'])
      continue
    status = 'ok' if c['ok'] else 'FAIL'
    if c['ok'] and c['segments_over_warn']:
      status = 'WARNING'
    rows.append([name, f'{len(c["segments"])} ({c["exact_segments"]} exact)',
      c['max_segment_ratio'], c['loosest_segment'], c['min_segment_ratio'],
      c['network_pairwise_max_certificate_over_converged'],
      c['estimate_over_converged'], status])  # fmt: skip
  headers = ['model', 'segments', 'max cert/conv', 'at segment', 'min cert/conv',
    'net pairwise cert/conv', '1-step est/conv', 'status']  # fmt: skip
  return bu.format_table(headers, rows)


def train_table(results: dict) -> str:
  rows = []
  for name, r in results.items():
    t = r['train_step']
    gloro = t.get('gloro')
    rows.append([name, 'x'.join(map(str, r['input_shape'])), r['batch_size'],
      f'{r["repeats"]}x{r["steps_per_repeat"]}', t['plain']['median_ms'],
      t['lmt']['median_ms'], t['lmt']['ratio_to_plain_paired_median'],
      t['lmt']['ratio_to_plain'], gloro['median_ms'] if gloro else '-',
      gloro['ratio_to_plain_paired_median'] if gloro else '-'])  # fmt: skip
  headers = ['model', 'input', 'batch', 'reps', 'plain ms/step', 'LMT ms/step',
    'LMT/plain', '(of medians)', 'GloRo ms/step', 'GloRo/plain']  # fmt: skip
  return bu.format_table(headers, rows)


def certification_table(results: dict) -> str:
  rows = []
  for name, r in results.items():
    c = r['certification']
    rows.append([name, r['batch_size'], c['bounds_first_s'], c['bounds_again_s'],
      c['plain']['images_per_s'], c['certify']['images_per_s'],
      c['certify_over_plain_time_paired_median'], c['certify_over_plain_time'],
      c['test_set_estimate']['certify_s'], c['test_set_estimate']['ratio']])  # fmt: skip
  headers = ['model', 'batch', 'bounds s (1st)', 'bounds s (2nd)', 'plain img/s',
    'certify img/s', 'certify/plain time', '(of medians)',
    f'{TEST_SET // 1000}k certify s', f'{TEST_SET // 1000}k certify/plain']  # fmt: skip
  return bu.format_table(headers, rows)


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  specs = model_specs(args, info['platform'])
  ctx, threads = blas_limit(args.blas_threads)
  print(f'lmt_bench on {bu.describe(info)}; host BLAS threads: {threads}', flush=True)
  results = {}
  t_start = time.perf_counter()
  with ctx:
    for spec in specs:
      record, ok = run_model(spec, args, info['platform'] == 'cpu')
      results[spec.name] = record
      if not ok:
        print('\nCorrectness check FAILED; no timings are reported.')
        print(correctness_table(results))
        for f in record['correctness']['failures']:
          print(f'  {spec.name}: {f}')
        raise SystemExit(1)
  print(f'\nDevice: {bu.describe(info)}')
  print(f'\nCorrectness after {args.check_steps + 1} LMT steps: cert = sound certificate (upper')
  print(f'bound), conv = {lmt.CONVERGED_ITERS} power-iteration steps (lower bound), est = the')
  print(f'1-step training estimate; fails if cert < conv * (1 - {FAIL_RTOL:g}) anywhere.')
  print(correctness_table(results))
  for name, r in results.items():
    c = r['correctness']
    if c['segments_over_warn']:
      print(
        f'WARNING: {name}: certificate/converged > {WARN_RATIO} at segment(s) '
        f'{c["segments_over_warn"]} (max {c["max_segment_ratio"]:.4f})'
      )
  print('\nTrain step: LMT (pairwise, 1 power-iteration step/segment) and GloRo vs plain CE')
  print('(ms: median over repeats of the mean step time; ratios: median of per-repeat ratios,')
  print('beside the ratio of medians; quote ratios, absolute times only with the device line)')
  print(train_table(results))
  print('\nCertification (eval logits + certified_radius, pairwise form, highest precision) vs')
  print('plain inference (eval logits + argmax), same batch; bounds = lmt.certificate (jaxpr')
  print(f'analysis, host float64); {TEST_SET // 1000}k = bounds once + {TEST_SET} images at that')
  print('rate')
  print(certification_table(results))
  out = bu.record('lmt_bench', info, args, total_s=time.perf_counter() - t_start, models=results)
  out['settings'].update(blas_threads_applied=threads, fail_rtol=FAIL_RTOL, warn_ratio=WARN_RATIO)
  bu.save_results(out, args.out, 'lmt_bench')
  return out


if __name__ == '__main__':
  main()
