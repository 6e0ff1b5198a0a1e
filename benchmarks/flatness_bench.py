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

2. The PyTorch peer (`--torch=auto` runs it where torch imports; on the same device as JAX):
   the same model with the same weights (`benchmarks/flatness_torch.py`). Checked first: its
   loss equals ours to 1e-4 and both of its HVPs equal ours on the same probe to 1e-3
   (relative, float32). Timed in the same interleaved rounds: its gradient, a double-backward
   HVP, a forward-over-reverse HVP (`torch.func`, jvp of grad; reported as unsupported if
   torch cannot run it on the model) and a loop of --probes double-backward HVPs.

Reported: HVP / gradient; vmapped probes per second over the loop's (speed-up), and the
linearized variant's; PyTorch's HVP time over ours, and PyTorch's probe loop over our faster
of the vmapped and looped probes. Absolute times only with the device line.
"""

import argparse
import importlib
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

from benchmarks import bench_util as bu  # noqa: E402
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
  p.add_argument(
    '--torch',
    default='auto',
    choices=('auto', 'yes', 'no'),
    help='PyTorch peer: auto runs it where torch imports, yes requires it',
  )
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


def _config(model) -> dict:
  """The architecture fields the PyTorch port needs."""
  return {
    f: getattr(model, f) for f in ('hidden', 'channels', 'depth', 'width') if hasattr(model, f)
  }


def _torch_peer(args):
  """The peer module, or None (with the reason printed) where --torch=auto and torch is absent."""
  if args.torch == 'no':
    return None
  try:
    flatness_torch = importlib.import_module('benchmarks.flatness_torch')
  except ImportError as e:
    if args.torch == 'yes':
      raise SystemExit(f'--torch=yes: PyTorch does not import ({e})') from e
    print(f'PyTorch peer skipped: {e}', flush=True)
    return None
  return flatness_torch


def check_peer(ft, peer, loss, params, one, hv) -> tuple[dict, list[str]]:
  """The peer's loss and HVPs against ours; returns (its working HVPs by name, failures)."""
  failures = []
  ours, theirs = float(loss(params)), float(peer.loss(peer.params))
  if abs(ours - theirs) > 1e-4 * abs(ours):
    failures.append(f'PyTorch loss {theirs:.7g} != ours {ours:.7g}')
  v = peer.probe(one)
  ref = ft.flat(peer.probe(hv), peer.keys)
  hvps = {'torch_double_backward': peer.double_backward_hvp()}
  outs = {'torch_double_backward': hvps['torch_double_backward'](v)}
  try:
    fr = peer.forward_over_reverse_hvp()
    outs['torch_forward_over_reverse'] = fr(v)
    hvps['torch_forward_over_reverse'] = fr
  except Exception as e:  # noqa: BLE001 - reported, not hidden: torch.func lacks some rules
    print(f'torch.func forward-over-reverse HVP unsupported: {type(e).__name__}: {str(e)[:200]}')
  for n, out in outs.items():
    err = np.linalg.norm(ft.flat(out, peer.keys) - ref) / np.linalg.norm(ref)
    if not err <= 1e-3:
      failures.append(f'{n} HVP vs ours: relative error {err:.3g}')
  return hvps, failures


def _loss(model, variables, x, y):
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params):
    logits = model.apply({'params': params, **rest}, x, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

  return loss


def check(loss, params, key) -> list[str]:
  ku, kv = jax.random.split(key)
  u = flatness.rademacher_probes(params, 1, key=ku)
  v = flatness.rademacher_probes(params, 1, key=kv)
  u, v = jax.tree.map(lambda a: a[0], u), jax.tree.map(lambda a: a[0], v)
  hvp = jax.jit(lambda p, w: flatness.hvp(loss, p, w))
  flat = lambda t: ravel_pytree(t)[0]  # noqa: E731
  hv, hu = hvp(params, v), hvp(params, u)
  uhv, vhu = float(flat(u) @ flat(hv)), float(flat(v) @ flat(hu))
  failures = []
  if abs(uhv - vhu) > 1e-3 * abs(uhv) + 1e-6:
    failures.append(f'HVP not symmetric: u.Hv = {uhv:.6g}, v.Hu = {vhu:.6g}')
  # An independent differentiation order: reverse over reverse, grad of <grad L, v>.
  # (v is an argument: closed over, XLA spends seconds constant-folding products with it.)
  rr = jax.jit(lambda p, w: jax.grad(lambda q: flat(jax.grad(loss)(q)) @ flat(w))(p))
  rr = flat(rr(params, v))
  err, ref = float(jnp.linalg.norm(flat(hv) - rr)), float(jnp.linalg.norm(rr))
  if not err <= 1e-3 * ref + 1e-6:
    failures.append(f'forward-over-reverse vs reverse-over-reverse: relative error {err / ref:.3g}')
  return failures


def run_model(name: str, args, ft=None) -> tuple[dict, list[str]]:
  model, shape = _model(name, args.smoke)
  key = jax.random.key(args.seed)
  x = jax.random.uniform(key, (args.batch_size, *shape))
  y = jax.random.randint(jax.random.fold_in(key, 1), (args.batch_size,), 0, 10)
  variables = model.init(jax.random.fold_in(key, 2), x[:1])
  params = variables['params']
  loss = _loss(model, variables, x, y)
  failures = [f'{name}: {f}' for f in check(loss, params, jax.random.fold_in(key, 3))]
  k = args.probes
  probes = flatness.rademacher_probes(params, k, key=jax.random.fold_in(key, 4))
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
  peer = None
  if ft is not None:
    device = 'cuda' if jax.devices()[0].platform == 'gpu' else 'cpu'
    peer = ft.Peer(name, _config(model), variables, x, y, device)
    hvps, f = check_peer(ft, peer, loss, params, one, hvp(params, one))
    failures += [f'{name}: {m}' for m in f]
    v1, vs = peer.probe(one), [peer.probe(s) for s in singles]
    tgrad, db = peer.grad_fn(), hvps['torch_double_backward']
    synced = lambda f: lambda: (f(), peer.sync())  # noqa: E731 - CUDA is asynchronous
    fns['torch_grad'] = synced(tgrad)
    for n, f in hvps.items():
      fns[n] = synced(lambda f=f: f(v1))
    fns['torch_loop'] = synced(lambda: [db(v) for v in vs])
  if failures:
    return {}, failures
  compile_s = {n: bu.timed(f)[1] for n, f in fns.items()}
  times = bu.interleaved_times(fns, {n: () for n in fns}, args.repeats, args.calls, advance=False)
  med = {n: statistics.median(t) for n, t in times.items()}
  n_params = flatness.num_params(params)
  res = {
    'params': n_params,
    'input_shape': shape,
    'batch_size': args.batch_size,
    'probes': k,
    'compile_and_first_call_s': compile_s,
    'times': {n: bu.summary(t) for n, t in times.items()},
    'hvp_over_grad': med['hvp'] / med['grad'],
    'vmap_speedup_over_loop': med['loop'] / med['vmap'],
    'linearized_speedup_over_loop': med['loop'] / med['linearized_vmap'],
    'vmap_per_probe_over_grad': med['vmap'] / k / med['grad'],
  }
  if peer is not None:
    best = min(med['vmap'], med['loop'], med['linearized_vmap'])
    res['torch'] = {
      'version': ft.torch.__version__,
      'device': peer.device,
      'threads': ft.torch.get_num_threads(),
      'hvp_over_grad': med['torch_double_backward'] / med['torch_grad'],
      'double_backward_over_ours': med['torch_double_backward'] / med['hvp'],
      'forward_over_reverse_over_ours': (
        med['torch_forward_over_reverse'] / med['hvp']
        if 'torch_forward_over_reverse' in med
        else None
      ),
      'loop_over_our_best_probes': med['torch_loop'] / best,
    }
  return res, failures


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  print(f'flatness_bench on {bu.describe(info)}', flush=True)
  ft = _torch_peer(args)
  results, failures = {}, []
  for name in args.models:
    results[name], f = run_model(name, args, ft)
    failures += f
    if not f:
      print(f'{name}: {results[name]["params"]} parameters', flush=True)
  if failures:
    bu.fail('HVP correctness', failures)
  print(f'\nDevice: {bu.describe(info)}; load average at start {info.get("load_average", "?")}')
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
    bu.format_table(
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
  peers = {n: r['torch'] for n, r in results.items() if 'torch' in r}
  if peers:
    t = next(iter(peers.values()))
    print(f'\nPyTorch {t["version"]} on {t["device"]} ({t["threads"]} threads), same weights:')
    rows = [
      [
        n,
        p['hvp_over_grad'],
        p['double_backward_over_ours'],
        p['forward_over_reverse_over_ours'] or 'unsupported',
        p['loop_over_our_best_probes'],
      ]
      for n, p in peers.items()
    ]
    heads = ['model', 'torch hvp/grad', 'double-backward / ours', 'torch.func fwd-rev / ours']
    print(bu.format_table([*heads, f'{args.probes}-probe loop / our best'], rows))
  out = bu.record('flatness_bench', info, args, models=results)
  bu.save_results(out, args.out, 'flatness_bench')
  return out


if __name__ == '__main__':
  main()
