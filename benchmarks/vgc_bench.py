r"""VGC benchmark: compress-step cost vs the memory-bandwidth floor, variance-estimate cost, and
the communication cost model fed with those measurements.

  PYTHONPATH=. python benchmarks/vgc_bench.py --out=benchmarks/results/vgc_bench_cpu.json

One call (synthetic data throughout; no dataset is needed):

0. Correctness (first; the benchmark refuses to report if it fails, exit status 1): on a small
   two-tensor tree, three jitted steps of every benchmarked method must conserve the gradient,
   `compression.decode(message) + new residual == old residual + gradient` per tensor (up to
   float32 rounding, relative 1e-6), must send something, and must send only elements that pass
   the method's own test (vgc: r^2 > alpha v; strom: |r| > tau; topk: no unsent |r| above a
   sent one), checked in numpy. On every benchmarked model the gradients of `variance.cheap`
   and `variance.microbatch` must equal those of `jax.value_and_grad`, and `variance.cheap`'s s
   must equal the exact per-example s (`variance.per_example`) on an 8-example batch.
1. Copy bandwidth BW: a jitted `x * 1.0001` over a large float32 array (read + write, 8 bytes
   per element), median over repeats; this is the STREAM-like number the floors use.
2. Compress step, per size d (one flat float32 tensor {'w': (d,)}; M = 2^20): the jitted
   `compressor.update(grads, state, variance)` (state donated unless --no-donate, so r and v are
   updated in place), grads and variance as inputs, state carried from call to call; compile
   excluded; median over repeats of the mean time of K calls, each repeat ending in
   `jax.block_until_ready`; methods interleaved (rotating order). The floor is the VGC floor
   24 B * d / BW (read g, s, r, v; write r, v: the message itself is ~capacity * 4 B more);
   'GB/s' is 24 d / time for every method, so rows compare at equal work; top-k and Strom
   have no v, so their own floor is 12 B * d / BW (also printed). Grads are N(0, 1) and the
   variance input 4 * U(0.5, 1.5) (about 1 % pass alpha = 2 on the first call; Strom's tau = 3
   is in the same units, 0.3 %). The same gradient is fed every call, so r grows and after a
   few calls every message slot is used (the 'overflow' column): the most scatter work.
3. Variance-estimate cost, per model (MLP, default hidden (1024, 1024) on 28x28x1, and the small
   CNN without batch norm on 28x28x1; batch 128; cross-entropy): jitted
   forward only (f: the loss), forward + backward (a: `jax.value_and_grad`), `variance.cheap`
   (b: loss, grads and s) and `variance.microbatch` with 4 micro-batches (c), interleaved.
   "Backward pass" here means a - f: the extra time `jax.value_and_grad` takes over evaluating
   the loss alone (XLA compiles the two separately, so this is a difference of two wall-clock
   times, not an isolated kernel). Reported: (b - a) / (a - f), the estimator's extra cost over
   that backward pass, and (b - a) / a, its extra cost over the whole gradient step (same for c).
4. Cost model (`cost_model.speedup_table`, n = --workers, alpha-beta, no overlap) for each
   measured model's parameter count, and for a --big_params (25M) model: dense bytes 4 d, sparse
   bytes 4 B per sent element (28-bit index + 4-bit code) at --density plus 8 B per tensor;
   t_compress = the VGC per-element time of the largest measured size * d (decode not
   included); t_variance = the model's measured b - a. For the measured models t_compute is
   their measured a (or --t_compute_ms); for the 25M rows t_compute is ASSUMED
   (--big_t_compute_ms, default 85 ms: ResNet-50 on an H100 in bf16 at batch 256, the worked
   example of the research notes) and t_variance = that t_compute * the measured (b - a) / a.
   Speedups at 1, 10, 100 Gbit/s, the break-even bandwidth B* and whether R > n/2.

Ratios are the numbers to quote; absolute times only with the device line printed above them.
The JSON (only with `--out=PATH`; a bare `--out` writes benchmarks/results/vgc_bench_cpu.json)
holds the device, the settings, every repeat's time and every ratio. The default sizes (up to
64M) finish in about three minutes on a 2-core CPU; --repeats / --var_repeats bound the time.
"""

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)


from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import models  # noqa: E402
from tsuzuku_jax.vgc import compression, cost_model, variance  # noqa: E402

VGC_BYTES = 24  # per element: read g, s, r, v and write r, v (float32).
OWN_BYTES = {'vgc': 24, 'hybrid': 24, 'strom': 12, 'topk': 12}  # no v for strom / topk.
BENCH_METHODS = tuple(OWN_BYTES)
GBITS = (1, 10, 100)
CONSERVE_RTOL = 1e-6
GRAD_RTOL = 1e-4  # gradients of the variance estimators vs value_and_grad
S_RTOL = 1e-3  # variance.cheap's s vs the per-example oracle
DEFAULT_OUT = os.path.join(_ROOT, 'benchmarks', 'results', 'vgc_bench_cpu.json')


def _parse_size(text: str) -> int:
  text = text.strip().upper()
  scale = {'K': 2**10, 'M': 2**20}.get(text[-1:], 1)
  return int(float(text[:-1] if scale > 1 else text) * scale)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(t) for t in text.split(',') if t.strip())


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument(
    '--sizes', default=None, help='Compress sizes, e.g. 1M,16M,64M (the default; M=2^20).'
  )
  p.add_argument('--methods', default='vgc,topk,strom', help=f'Some of {BENCH_METHODS}; needs vgc.')
  p.add_argument('--alpha', type=float, default=2.0, help='VGC: send when r^2 > alpha v.')
  p.add_argument('--zeta', type=float, default=0.999, help='VGC: decay of v.')
  p.add_argument('--capacity', type=float, default=0.01, help='vgc/strom message slots / size.')
  p.add_argument('--topk_density', type=float, default=0.001, help='top-k: fraction sent.')
  p.add_argument('--tau', type=float, default=3.0, help='Strom threshold (grads are N(0, 1)).')
  p.add_argument('--donate', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--repeats', type=int, default=5, help='Compress repeats (median over them).')
  p.add_argument('--bw_elements', default='-1', help='Copy-bandwidth array size; -1: max size.')
  p.add_argument('--bw_repeats', type=int, default=10)
  p.add_argument(
    '--min_repeat_s', type=float, default=0.2, help='Raise the calls per repeat of cheap steps.'
  )
  p.add_argument('--models', default='mlp,cnn', help='Variance-cost models: mlp, cnn.')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--mlp_hidden', default='1024,1024', help='MLP hidden widths.')
  p.add_argument('--mlp_input', type=int, default=28, help='MLP input side (HxWx1).')
  p.add_argument('--microbatches', type=int, default=4)
  p.add_argument('--var_repeats', type=int, default=5, help='Variance-cost repeats.')
  p.add_argument(
    '--density',
    type=float,
    default=0.01,
    help='Cost model: mean fraction of elements sent per step (docs/vgc.md gives the\n'
    'density measured by the digits runs; 0.01 is a placeholder of that order).',
  )
  p.add_argument('--workers', type=int, default=8)
  p.add_argument('--latency_us', type=float, default=25.0, help='Per-message latency.')
  p.add_argument(
    '--t_compute_ms', type=float, default=-1, help='Model rows; -1: measured forward+backward.'
  )
  p.add_argument('--big_params', type=int, default=25_000_000)
  p.add_argument(
    '--big_t_compute_ms',
    type=float,
    default=85.0,
    help='ASSUMED step compute of the big model (85: ResNet-50, H100 bf16, batch 256).',
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true', help='Tiny sizes, models and repeats (seconds).')
  p.add_argument(
    '--out',
    nargs='?',
    const=DEFAULT_OUT,
    default='',
    help='JSON path (no JSON unless given; bare --out: benchmarks/results/vgc_bench_cpu.json).',
  )
  args = p.parse_args(argv)
  try:
    sizes = args.sizes or ('4096,65536' if args.smoke else '1M,16M,64M')
    args.sizes = sorted({_parse_size(s) for s in sizes.split(',') if s.strip()})
    args.bw_elements = _parse_size(args.bw_elements)
    args.mlp_hidden = _ints(args.mlp_hidden)
  except ValueError as e:
    p.error(f'bad size or width list: {e}')
  if not args.sizes or not all(1 <= s < 2**compression.MAX_INDEX_BITS for s in args.sizes):
    p.error(f'--sizes must be in [1, 2^{compression.MAX_INDEX_BITS}), got {sizes!r}')
  args.methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  if 'vgc' not in args.methods or any(m not in BENCH_METHODS for m in args.methods):
    p.error(f'--methods must include vgc and name only {BENCH_METHODS}')
  args.models = [m.strip() for m in args.models.split(',') if m.strip()]
  if not args.models or any(m not in ('mlp', 'cnn') for m in args.models):
    p.error('--models must name some of mlp, cnn')
  for flag in ('repeats', 'bw_repeats', 'var_repeats', 'batch_size', 'workers', 'big_params'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag} must be >= 1, got {getattr(args, flag)}')
  if args.microbatches < 2 or args.batch_size % args.microbatches:
    p.error(f'--microbatches must be >= 2 and divide --batch_size={args.batch_size}')
  for flag in ('density', 'capacity', 'topk_density'):
    if not 0 < getattr(args, flag) <= 1:
      p.error(f'--{flag} must be in (0, 1], got {getattr(args, flag)}')
  if args.alpha < 0 or args.tau <= 0 or not 0 < args.zeta <= 1 or args.big_t_compute_ms <= 0:
    p.error('need --alpha >= 0, --tau > 0, --zeta in (0, 1], --big_t_compute_ms > 0')
  if args.bw_elements == -1:
    args.bw_elements = max(args.sizes)
  if args.bw_elements < 1 or not args.mlp_hidden or args.mlp_input < 1:
    p.error('--bw_elements, --mlp_hidden and --mlp_input must be positive')
  return args


def _calls(once_s: float, min_repeat_s: float) -> int:
  return max(1, min(1000, math.ceil(min_repeat_s / max(once_s, 1e-9))))


def make_compressor(method: str, args: argparse.Namespace) -> compression.Compressor:
  return compression.make(
    method,
    alpha=args.alpha,
    zeta=args.zeta,
    tau=args.tau,
    density=args.topk_density,
    capacity=args.capacity,
  )


@functools.partial(jax.jit, static_argnums=1)
def _grads_and_variance(key, d: int) -> tuple[dict, dict]:
  """Synthetic {'w': (d,)} grads ~ N(0, 1) and variance ~ 4 U(0.5, 1.5)."""
  kg, ks = jax.random.split(key)
  g = jax.random.normal(kg, (d,), jnp.float32)
  s = 4.0 * jax.random.uniform(ks, (d,), jnp.float32, 0.5, 1.5)
  return {'w': g}, {'w': s}


def check_conservation(args: argparse.Namespace, steps: int = 3) -> tuple[dict, bool]:
  """Error feedback and selection checks of every method on a small tree (numpy reference)."""
  shapes = {'b': (7,), 'w': (64, 64)}
  records, failures = {}, []
  for method in args.methods:
    comp = make_compressor(method, args)
    update = jax.jit(comp.update)
    state = comp.init({k: jnp.zeros(v) for k, v in shapes.items()})
    worst, sent = 0.0, 0
    rng = np.random.default_rng(args.seed)
    for step in range(steps):
      g = {k: rng.standard_normal(v, np.float32) for k, v in shapes.items()}
      s = {k: rng.uniform(2.0, 6.0, v).astype(np.float32) for k, v in shapes.items()}
      msgs, new, stats = update(g, state, s)
      sent += int(stats['sent'])
      for name in shapes:
        acc = (np.asarray(state.residual[name]) + g[name]).astype(np.float64).reshape(-1)
        size = acc.size
        got = np.asarray(compression.decode(msgs[name], size), np.float64)
        got = got + np.asarray(new.residual[name], np.float64).reshape(-1)
        err = float(np.max(np.abs(got - acc)) / max(np.max(np.abs(acc)), 1e-30))
        worst = max(worst, err)
        if err > CONSERVE_RTOL:
          failures.append(f'{method} step {step} {name}: decoded + residual != r + g (rel {err:g})')
        index = np.asarray(compression.unpack_index(msgs[name].words))
        index = index[index < size]
        if method in ('vgc', 'hybrid'):
          v_acc = (np.asarray(state.variance[name]) + s[name]).astype(np.float64).reshape(-1)
          bad = np.sum(acc[index] ** 2 <= args.alpha * v_acc[index])
        elif method == 'strom':
          bad = np.sum(np.abs(acc[index]) <= args.tau)
        else:
          unsent = np.delete(np.abs(acc), index)
          top = np.min(np.abs(acc[index])) if index.size else np.inf
          bad = int(unsent.size > 0 and np.max(unsent) > top)
        if bad:
          failures.append(f'{method} step {step} {name}: {bad} sent element(s) fail the test')
      state = new
    if sent == 0:
      failures.append(f'{method}: nothing sent in {steps} steps (the check would be vacuous)')
    records[method] = {'max_rel_error': worst, 'sent': sent}
  return {'ok': not failures, 'failures': failures, 'methods': records}, not failures


def measure_bandwidth(args: argparse.Namespace) -> dict:
  """Copy bandwidth (bytes/s) of a jitted x * 1.0001: 8 bytes per element per call."""
  n = args.bw_elements
  scale = jax.jit(lambda x: x * 1.0001, donate_argnums=(0,) if args.donate else ())
  x = jnp.ones((n,), jnp.float32)
  x, compile_s = bu.timed(scale, x)
  x, once = bu.timed(scale, x)
  k = _calls(once, 0.0 if args.smoke else args.min_repeat_s)
  times = []
  for _ in range(args.bw_repeats):
    t0 = time.perf_counter()
    for _ in range(k):
      x = scale(x)
    jax.block_until_ready(x)
    times.append((time.perf_counter() - t0) / k)
  record = {'elements': n, 'bytes_per_call': 8 * n, 'calls_per_repeat': k, **bu.summary(times)}
  record['bytes_per_s'] = 8 * n / (record['median_ms'] / 1e3)
  record['compile_s'] = compile_s
  return record


def time_compress(d: int, args: argparse.Namespace, bw: float) -> dict:
  """Per-method timings of the jitted local compress step on one flat tensor of d elements."""
  g, s = _grads_and_variance(jax.random.key(args.seed), d)
  fns, states, compile_s, calls, last = {}, {}, {}, {}, {}
  for method in args.methods:
    comp = make_compressor(method, args)
    fns[method] = jax.jit(comp.update, donate_argnums=(1,) if args.donate else ())
    # init's residual and variance share zero buffers; donation needs distinct ones.
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), comp.init(g))
    out, compile_s[method] = bu.timed(fns[method], g, state, s)
    out, once = bu.timed(fns[method], g, out[1], s)
    states[method] = out[1]
    calls[method] = _calls(once, 0.0 if args.smoke else args.min_repeat_s)
  times = {m: [] for m in args.methods}
  names = list(args.methods)
  for r in range(args.repeats):
    shift = r % len(names)
    for m in names[shift:] + names[:shift]:
      state = states[m]
      t0 = time.perf_counter()
      for _ in range(calls[m]):
        out = fns[m](g, state, s)
        state = out[1]
      jax.block_until_ready(out)
      times[m].append((time.perf_counter() - t0) / calls[m])
      states[m], last[m] = state, out[2]
  floor_s = VGC_BYTES * d / bw
  record = {}
  for m in names:
    t = bu.summary(times[m])
    sec = t['median_ms'] / 1e3
    own_floor_s = OWN_BYTES[m] * d / bw
    record[m] = {
      **t,
      'calls_per_repeat': calls[m],
      'compile_and_first_call_s': compile_s[m],
      'floor_ms': 1e3 * floor_s,
      'ratio_to_floor': sec / floor_s,
      'achieved_gb_s': VGC_BYTES * d / sec / 1e9,
      'own_floor_bytes_per_element': OWN_BYTES[m],
      'ratio_to_own_floor': sec / own_floor_s,
      'ns_per_element': 1e9 * sec / d,
      'last_stats': {k: int(v) for k, v in last[m].items()},
    }
  return record


def make_loss(model: nn.Module) -> Callable:
  def loss_fn(params, batch):
    logits = model.apply({'params': params}, batch['image'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch['label'])

  return loss_fn


def variance_models(args: argparse.Namespace) -> dict:
  if args.smoke:
    table = {
      'mlp': (models.MLP(hidden=(32,)), (8, 8, 1)),
      'cnn': (models.CNN(channels=(4, 8), dense=16, batch_norm=False), (12, 12, 1)),
    }
  else:
    side = args.mlp_input
    table = {
      'mlp': (models.MLP(hidden=args.mlp_hidden), (side, side, 1)),
      'cnn': (models.CNN(batch_norm=False), (28, 28, 1)),
    }
  return {name: table[name] for name in args.models}


def _max_rel(a, b) -> float:
  errs = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errs.append(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
  return max(errs)


def time_variance(
  name: str, model: nn.Module, shape, args: argparse.Namespace
) -> tuple[dict, bool]:
  """Correctness of the estimators on this model, then f / a / b / c timings (interleaved)."""
  b = 8 if args.smoke else args.batch_size
  # Host data and a jitted init: eager JAX ops would each compile a kernel (seconds on a CPU).
  rng = np.random.default_rng(args.seed + 1)
  batch = {
    'image': jnp.asarray(rng.uniform(size=(b, *shape)), jnp.float32),
    'label': jnp.asarray(rng.integers(0, 10, b), jnp.int32),
  }
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)))['params'])
  params = init(jax.random.key(args.seed))
  loss_fn = make_loss(model)
  m = args.microbatches
  fns = {
    'forward': jax.jit(loss_fn),
    'fwd_bwd': jax.jit(jax.value_and_grad(loss_fn, has_aux=True)),
    'cheap': jax.jit(lambda p, x: variance.cheap(loss_fn, p, x)),
    'microbatch': jax.jit(lambda p, x: variance.microbatch(loss_fn, p, x, m)),
  }
  record = {
    'model': repr(model),
    'input_shape': list(shape),
    'batch_size': b,
    'params': int(sum(x.size for x in jax.tree.leaves(params))),
    'tensors': len(jax.tree.leaves(params)),
    'microbatches': m,
  }
  outs, compile_s = {}, {}
  for k, fn in fns.items():
    outs[k], compile_s[k] = bu.timed(fn, params, batch)
  grads = outs['fwd_bwd'][1]
  small = jax.tree.map(lambda a: a[: min(8, b)], batch)
  s_cheap = outs['cheap'][2] if b <= 8 else fns['cheap'](params, small)[2]
  _, _, s_exact = jax.jit(lambda p, x: variance.per_example(loss_fn, p, x))(params, small)
  check = {
    'cheap_grad_rel_error': _max_rel(outs['cheap'][1], grads),
    'microbatch_grad_rel_error': _max_rel(outs['microbatch'][1], grads),
    'cheap_s_rel_error_vs_per_example': _max_rel(s_cheap, s_exact),
  }
  tol = {'cheap_s_rel_error_vs_per_example': S_RTOL}
  failures = [
    f'{name}: {k} = {v:g} > {tol.get(k, GRAD_RTOL):g}'
    for k, v in check.items()
    if not v <= tol.get(k, GRAD_RTOL)
  ]
  record['correctness'] = {'ok': not failures, 'failures': failures, **check}
  if failures:
    return record, False

  min_s = 0.0 if args.smoke else args.min_repeat_s
  calls = _calls(bu.timed(fns['fwd_bwd'], params, batch)[1], min_s)
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(args.var_repeats):
    shift = r % len(names)
    for k in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fns[k](params, batch)
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / calls)
  res = {k: {**bu.summary(v), 'compile_and_first_call_s': compile_s[k]} for k, v in times.items()}
  f, a = res['forward']['median_ms'], res['fwd_bwd']['median_ms']
  backward = a - f
  record.update(res)
  record['repeats'], record['calls_per_repeat'] = args.var_repeats, calls
  record['backward_ms'] = backward
  for k in ('cheap', 'microbatch'):
    extra = res[k]['median_ms'] - a
    record[f'{k}_extra_ms'] = extra
    record[f'{k}_extra_over_backward'] = extra / backward if backward > 0 else float('nan')
    record[f'{k}_extra_over_step'] = extra / a
  return record, True


def sparse_bytes(d: int, tensors: int, density: float) -> float:
  """Allgatherv-ideal message bytes: one 4-byte word per sent element, 8 bytes per tensor."""
  return 4 * math.ceil(density * d) + 8 * tensors


def cost_model_rows(args: argparse.Namespace, compress: dict, var: dict) -> dict:
  """`cost_model.speedup_table` rows for each measured model and for the big model."""
  big_d = max(compress)
  per_elem_s = compress[big_d]['vgc']['median_ms'] / 1e3 / big_d
  latency = args.latency_us * 1e-6
  rows = []

  def row(name, d, tensors, t_compute, t_var, assumed):
    m = cost_model.StepModel(
      dense_bytes=4 * d,
      sparse_bytes=sparse_bytes(d, tensors, args.density),
      workers=args.workers,
      t_compute=t_compute,
      t_compress=per_elem_s * d,
      t_variance=t_var,
      latency=latency,
    )
    table = cost_model.speedup_table(m, GBITS)
    rows.append({'name': name, 'params': d, 't_compute_assumed': assumed, **table})

  for name, r in var.items():
    measured = r['fwd_bwd']['median_ms'] / 1e3
    t_compute = args.t_compute_ms / 1e3 if args.t_compute_ms > 0 else measured
    row(name, r['params'], r['tensors'], t_compute, r['cheap_extra_ms'] / 1e3, False)
  big_t = args.big_t_compute_ms / 1e3
  for name, r in var.items():
    ratio = r['cheap_extra_over_step']
    label = f'{args.big_params / 1e6:g}M (var of {name})'
    row(label, args.big_params, 1, big_t, big_t * ratio, True)
  return {
    'compress_per_element_ns': 1e9 * per_elem_s,
    'compress_per_element_from_size': big_d,
    'density': args.density,
    'workers': args.workers,
    'latency_s': latency,
    'big_t_compute_ms_assumed': args.big_t_compute_ms,
    'rows': rows,
  }


def _size(d: int) -> str:
  for unit, scale in (('M', 2**20), ('K', 2**10)):
    if d % scale == 0:
      return f'{d // scale}{unit}'
  return str(d)


def correctness_table(check: dict) -> str:
  rows = [[m, r['sent'], r['max_rel_error']] for m, r in check['methods'].items()]
  return bu.format_table(['method', 'elements sent', 'max rel |dec + r_new - (r + g)|'], rows)


def compress_table(compress: dict) -> str:
  rows = []
  for d, per in compress.items():
    for m, r in per.items():
      rows.append([m, _size(d), f'{len(r["times_ms"])}x{r["calls_per_repeat"]}',
        r['median_ms'], r['floor_ms'], r['ratio_to_floor'], r['achieved_gb_s'],
        r['ratio_to_own_floor'], r['ns_per_element'], r['last_stats']['sent'],
        r['last_stats']['overflow']])  # fmt: skip
  headers = ['method', 'd', 'reps', 'ms', 'floor ms (24B)', 'ms/floor', 'GB/s (24B)',
    'ms/own floor', 'ns/elem', 'sent', 'overflow']  # fmt: skip
  return bu.format_table(headers, rows)


def variance_table(var: dict) -> str:
  rows = []
  for name, r in var.items():
    rows.append([name, r['params'], r['batch_size'], r['forward']['median_ms'],
      r['fwd_bwd']['median_ms'], r['backward_ms'], r['cheap']['median_ms'],
      r['cheap_extra_over_backward'], r['cheap_extra_over_step'],
      r['microbatch']['median_ms'], r['microbatch_extra_over_backward'],
      r['microbatch_extra_over_step']])  # fmt: skip
  headers = ['model', 'params', 'batch', 'fwd f ms', 'fwd+bwd a ms', 'bwd a-f',
    'cheap b ms', '(b-a)/(a-f)', '(b-a)/a', 'micro c ms', '(c-a)/(a-f)', '(c-a)/a']  # fmt: skip
  return bu.format_table(headers, rows)


def cost_table(cost: dict) -> str:
  rows = []
  for r in cost['rows']:
    inputs = r['inputs']
    t_compute = 1e3 * inputs['t_compute']
    rows.append([r['name'], r['params'], r['byte_ratio'], r['allgather_wins_bytes'],
      f'{t_compute:.3g}' + (' ASSUMED' if r['t_compute_assumed'] else ''),
      1e3 * inputs['t_variance'], 1e3 * inputs['t_compress'],
      *[row['speedup'] for row in r['rows']], r['break_even_gbit']])  # fmt: skip
  headers = ['model', 'params', 'R bytes', f'R > n/2={cost["workers"] / 2:g}',
    't_compute ms', 't_var ms', 't_c ms', *[f'x @{g} Gbit/s' for g in GBITS],
    'B* Gbit/s']  # fmt: skip
  return bu.format_table(headers, rows)


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  print(f'vgc_bench on {bu.describe(info)}', flush=True)
  t_start = time.perf_counter()
  log = lambda msg: print(f'[{time.perf_counter() - t_start:6.1f}s] {msg}', flush=True)

  log(f'conservation check of {", ".join(args.methods)}')
  check, ok = check_conservation(args)
  if not ok:
    bu.fail('Conservation', check['failures'])

  log(f'copy bandwidth on {_size(args.bw_elements)} float32')
  bw = measure_bandwidth(args)
  bw_bytes = bw['bytes_per_s']
  compress = {}
  for d in args.sizes:
    log(f'compress step, d = {_size(d)}: {", ".join(args.methods)}')
    compress[d] = time_compress(d, args, bw_bytes)

  var = {}
  for name, (model, shape) in variance_models(args).items():
    log(f'variance estimators on {name} {shape}')
    var[name], ok = time_variance(name, model, shape, args)
    if not ok:
      bu.fail('Variance-estimator', var[name]['correctness']['failures'])
  cost = cost_model_rows(args, compress, var)

  print(f'\nDevice: {bu.describe(info)}; load average at start {info.get("load_average", "?")}')
  print('\nCorrectness (3 jitted steps, small tree): conservation and selection tests pass.')
  print(correctness_table(check))
  print(
    f'\nCopy bandwidth (jitted x * 1.0001, {_size(args.bw_elements)} float32, 8 B/elem): '
    f'{bw_bytes / 1e9:.2f} GB/s (median of {args.bw_repeats})'
  )
  donated = 'state donated' if args.donate else 'state not donated'
  print(f'\nCompress step (jitted update, {donated}; floor = 24 B * d / BW; GB/s = 24 d / time;')
  print('own floor: 12 B/elem for topk/strom, which keep no v; sent/overflow: last call)')
  print(
    f'vgc alpha {args.alpha} capacity {args.capacity}; topk density {args.topk_density}; '
    f'strom tau {args.tau} capacity {args.capacity}'
  )
  print(compress_table(compress))
  print('\nVariance-estimate cost (f = loss only, a = value_and_grad, backward = a - f;')
  print(f'b = variance.cheap, c = variance.microbatch with {args.microbatches} micro-batches)')
  print(variance_table(var))
  print(
    f'\nCost model: n = {args.workers}, latency {args.latency_us:g} us, density {args.density:g} '
    '(4 B/sent element), no overlap; t_c = VGC '
    f'{cost["compress_per_element_ns"]:.3g} ns/elem (measured at d = '
    f'{_size(cost["compress_per_element_from_size"])}) * params, decode excluded'
  )
  print(cost_table(cost))
  print(
    f'ASSUMPTION: the {args.big_params / 1e6:g}M rows use t_compute = {args.big_t_compute_ms:g} ms '
    '(--big_t_compute_ms; an H100 bf16 ResNet-50 step), NOT a measurement, with t_var = that * '
    'the measured (b - a)/a and t_c measured on THIS device.'
  )

  out = bu.record(
    'vgc_bench', info, args, total_s=time.perf_counter() - t_start, correctness=check,
    bandwidth=bw, compress={str(d): r for d, r in compress.items()}, variance=var, cost_model=cost,
  )  # fmt: skip
  if args.out:
    bu.write_json(args.out, out)
  return out


if __name__ == '__main__':
  main()
