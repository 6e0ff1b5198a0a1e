r"""Flatness benchmark: what a Hessian-vector product costs against a gradient, and what
vmapping the probes buys over a Python loop of probes.

  PYTHONPATH=. python benchmarks/flatness_bench.py --out=benchmarks/results/flatness_bench_cpu.json

Per model (synthetic inputs and labels; mean softmax cross-entropy over one batch; float32):

0. Correctness (first; the benchmark refuses to report if it fails, exit status 1): the HVP is
   symmetric, |u.Hv - v.Hu| <= 1e-3 |u.Hv| + tiny, and equals the other differentiation order,
   reverse over reverse (grad of <grad L, v>), to a relative 1e-3 in float32. (A finite
   difference of gradients is no check on a ReLU network: its steps cross activation kinks.)
1. Times, compile excluded, median over --repeats of the mean of K calls, interleaved:
   the jitted gradient; one jitted HVP (`flatness.hvp`, forward over reverse); --probes HVPs
   vmapped in one jit (`jax.vmap`), the same through `flatness.hessian_op` (gradient
   linearized once, then vmapped), and a Python loop of --probes single-HVP calls.

Reported: HVP / gradient; vmapped probes per second over the loop's (speed-up), and the
linearized variant's. Absolute times only with the device line.
"""

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

from benchmarks.bench_util import (  # noqa: E402
  describe,
  device_info,
  fail,
  format_table,
  interleaved_times,
  save_results,
  summary,
  timed,
)
from tsuzuku_jax import flatness, models  # noqa: E402

MODELS = ('mlp', 'cnn', 'wrn')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--models', default='mlp,cnn', help=f'comma-separated, from {MODELS}')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--probes', type=int, default=16, help='probes for vmap vs loop')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--calls', type=int, default=3, help='calls per repeat')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true', help='tiny settings for the tests')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/...)')
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  bad = [m for m in args.models if m not in MODELS]
  if bad or not args.models:
    p.error(f'--models: unknown {bad} (choose from {MODELS})')
  if min(args.batch_size, args.probes, args.repeats, args.calls) < 1:
    p.error('--batch_size, --probes, --repeats and --calls must be >= 1')
  if args.smoke:
    args.batch_size, args.probes, args.repeats, args.calls = 8, 4, 2, 1
  return args


def _model(name: str, smoke: bool):
  if name == 'mlp':
    return models.MLP(10, (32,) if smoke else (1024, 1024)), (28, 28, 1)
  if name == 'cnn':
    return models.CNN(10, (8, 16) if smoke else (32, 64), 32 if smoke else 256, False), (
      32,
      32,
      3,
    )
  return models.WideResNet(depth=10 if smoke else 16, width=1 if smoke else 4), (32, 32, 3)


def _loss(model, variables, x, y):
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params):
    logits = model.apply({'params': params, **rest}, x, train=False, mode='none')[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

  return loss


def check(loss, params, key) -> list[str]:
  ku, kv = jax.random.split(key)
  u = flatness.rademacher_probes(ku, params, 1)
  v = flatness.rademacher_probes(kv, params, 1)
  u, v = jax.tree.map(lambda a: a[0], u), jax.tree.map(lambda a: a[0], v)
  hvp = jax.jit(lambda p, w: flatness.hvp(loss, p, w))
  flat = lambda t: ravel_pytree(t)[0]  # noqa: E731
  hv, hu = hvp(params, v), hvp(params, u)
  uhv, vhu = float(flat(u) @ flat(hv)), float(flat(v) @ flat(hu))
  failures = []
  if abs(uhv - vhu) > 1e-3 * abs(uhv) + 1e-6:
    failures.append(f'HVP not symmetric: u.Hv = {uhv:.6g}, v.Hu = {vhu:.6g}')
  # An independent differentiation order: reverse over reverse, grad of <grad L, v>.
  rr = flat(jax.jit(jax.grad(lambda p: flat(jax.grad(loss)(p)) @ flat(v)))(params))
  err, ref = float(jnp.linalg.norm(flat(hv) - rr)), float(jnp.linalg.norm(rr))
  if not err <= 1e-3 * ref + 1e-6:
    failures.append(f'forward-over-reverse vs reverse-over-reverse: relative error {err / ref:.3g}')
  return failures


def run_model(name: str, args) -> tuple[dict, list[str]]:
  model, shape = _model(name, args.smoke)
  key = jax.random.key(args.seed)
  x = jax.random.uniform(key, (args.batch_size, *shape))
  y = jax.random.randint(jax.random.fold_in(key, 1), (args.batch_size,), 0, 10)
  variables = model.init(jax.random.fold_in(key, 2), x[:1])
  params = variables['params']
  loss = _loss(model, variables, x, y)
  failures = [f'{name}: {f}' for f in check(loss, params, jax.random.fold_in(key, 3))]
  k = args.probes
  probes = flatness.rademacher_probes(jax.random.fold_in(key, 4), params, k)
  one = jax.tree.map(lambda a: a[0], probes)
  # Parameters are jit arguments, not closed-over constants: XLA would constant-fold through
  # them (a CNN's max-pool under vmap then takes minutes to compile).
  grad = jax.jit(jax.grad(loss))
  hvp = jax.jit(lambda p, v: flatness.hvp(loss, p, v))
  vmapped = jax.jit(lambda p, vs: jax.vmap(lambda v: flatness.hvp(loss, p, v))(vs))
  linear = jax.jit(lambda p, vs: jax.vmap(flatness.hessian_op(loss, p))(vs))
  singles = [jax.tree.map(lambda a, i=i: a[i], probes) for i in range(k)]
  fns = {
    'grad': lambda: grad(params),
    'hvp': lambda: hvp(params, one),
    'vmap': lambda: vmapped(params, probes),
    'linearized_vmap': lambda: linear(params, probes),
    'loop': lambda: [hvp(params, s) for s in singles],
  }
  compile_s = {n: timed(f)[1] for n, f in fns.items()}
  times = interleaved_times(fns, {n: () for n in fns}, args.repeats, args.calls, advance=False)
  med = {n: statistics.median(t) for n, t in times.items()}
  n_params = flatness.num_params(params)
  res = {
    'params': n_params,
    'input_shape': shape,
    'batch_size': args.batch_size,
    'probes': k,
    'compile_and_first_call_s': compile_s,
    'times': {n: summary(t) for n, t in times.items()},
    'hvp_over_grad': med['hvp'] / med['grad'],
    'vmap_speedup_over_loop': med['loop'] / med['vmap'],
    'linearized_speedup_over_loop': med['loop'] / med['linearized_vmap'],
    'vmap_per_probe_over_grad': med['vmap'] / k / med['grad'],
  }
  return res, failures


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = device_info()
  print(f'flatness_bench on {describe(info)}', flush=True)
  results, failures = {}, []
  for name in args.models:
    results[name], f = run_model(name, args)
    failures += f
    print(f'{name}: {results[name]["params"]} parameters', flush=True)
  if failures:
    fail('HVP correctness', failures)
  print(f'\nDevice: {describe(info)}; load average at start {info.get("load_average", "?")}')
  rows = [
    [
      n,
      r['params'],
      r['times']['grad']['median_ms'],
      r['times']['hvp']['median_ms'],
      r['hvp_over_grad'],
      r['vmap_per_probe_over_grad'],
      r['vmap_speedup_over_loop'],
      r['linearized_speedup_over_loop'],
    ]
    for n, r in results.items()
  ]
  print(f'\nHVP vs gradient, batch {args.batch_size}; {args.probes} probes vmapped vs a loop:')
  print(
    format_table(
      [
        'model',
        'params',
        'grad ms',
        'hvp ms',
        'hvp/grad',
        'vmap hvp/grad per probe',
        'vmap vs loop',
        'linearized vs loop',
      ],
      rows,
    )
  )
  out = {
    'ok': True,
    'device': info,
    'device_description': describe(info),
    'settings': {k: v for k, v in vars(args).items() if k != 'out'},
    'models': results,
  }
  save_results(out, args.out, 'flatness_bench')
  return out


if __name__ == '__main__':
  main()
