r"""How tight the jaxpr analysis' certificates are, on models trained with LMT on digits.

  PYTHONPATH=. python benchmarks/lmt_tightness.py --out=benchmarks/results/lmt_tightness_cpu.json

Per model (plain Flax: the library's MLP, CNN and LiResNet, LMT-trained on the 8x8 digits for
`--steps` steps), the whole network's Lipschitz bound three ways:

- found: the largest spectral norm of the input Jacobian of the logits found on the test images
  and after `--ascent_steps` of gradient ascent on it from the worst 16 (a lower bound on the
  true constant);
- segments: `lmt.certificate` (linear segments between nonlinearities bounded as one operator,
  exactly in float64 when their dense matrix is small);
- product: the same analysis with `exact_max_entries=0`, so every segment is bounded by the
  product of its steps' bounds (per conv / dense layer, with batch-norm scales and linear
  residual blocks folded into the kernel), as a per-layer certificate would be.

Ratios to `found` are the numbers to quote (1 would be exact); both certificates must be >= it.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import data, lmt, models, train_lib  # noqa: E402
from tsuzuku_jax.lmt import analysis  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--steps', type=int, default=2000, help='LMT training steps per model.')
  p.add_argument('--ascent_steps', type=int, default=50, help='Jacobian-norm ascent steps.')
  p.add_argument('--smoke', action='store_true', help='Tiny models and steps (seconds).')
  p.add_argument('--out', default=None, help='JSON path ("" for none).')
  args = p.parse_args(argv)
  if args.steps < 1 or args.ascent_steps < 0:
    p.error('--steps must be >= 1 and --ascent_steps >= 0')
  return args


def model_zoo(smoke: bool) -> dict:
  if smoke:
    return {
      'mlp': models.MLP(hidden=(16,)),
      'cnn': models.CNN(channels=(4, 8), dense=16, batch_norm=False),
      'liresnet': models.LiResNet(width=4, depth=2, neck=8, dense=16),
    }
  return {
    'mlp': models.MLP(hidden=(1024,)),
    'cnn': models.CNN(channels=(16, 32), dense=128, batch_norm=False),
    'cnn_bn': models.CNN(channels=(16, 32), dense=128, batch_norm=True),
    'liresnet': models.LiResNet(width=16, depth=2, neck=32, dense=64),
  }


def largest_jacobian_norm(apply_fn, variables, images, ascent_steps: int) -> float:
  """Max over images of ||d logits / d x||_2, then gradient ascent on it from the worst 16."""

  def norm(x):
    jac = jax.jacfwd(lambda z: apply_fn(variables, z[None])[0])(x)
    return jnp.linalg.norm(jac.reshape(jac.shape[0], -1), 2)

  norms = jax.jit(jax.vmap(norm))
  found = np.asarray(
    jnp.concatenate([norms(images[i : i + 64]) for i in range(0, len(images), 64)])
  )
  x = jnp.asarray(images[np.argsort(-found)[:16]])
  step = jax.jit(jax.vmap(lambda z: z + 0.05 * jax.grad(norm)(z)))
  best = float(found.max())
  for _ in range(ascent_steps):
    x = step(x)
    best = max(best, float(jnp.max(norms(x))))
  return best


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  print(f'lmt_tightness on {bu.describe(info)}', flush=True)
  xtr, ytr = data.load('digits', 'train')
  xte, _ = data.load('digits', 'test')
  steps = 20 if args.smoke else args.steps
  config = train_lib.TrainConfig(
    steps=steps, batch_size=128, learning_rate=3e-3, log_every=max(steps // 4, 1),
    checkpoint_every=steps,
  )  # fmt: skip
  results, rows = {}, []
  for name, model in model_zoo(args.smoke).items():
    t0 = time.perf_counter()
    apply_fn = train_lib.apply_fn(model)
    loss = lmt.training_loss(apply_fn, xtr.shape[1:], c=1.0, c_warmup_steps=steps // 3, clip=True)
    with tempfile.TemporaryDirectory() as workdir:
      state = train_lib.train(model, config, xtr, ytr, workdir, loss=loss, log=lambda s: None)
    variables = train_lib.variables_of(jax.device_get(state))
    with jax.default_matmul_precision('highest'):
      segments = lmt.certificate(apply_fn, variables, xtr.shape[1:])
      product = analysis.certificate(apply_fn, variables, xtr.shape[1:], exact_max_entries=0)
      found = largest_jacobian_norm(
        apply_fn, variables, xte, 0 if args.smoke else args.ascent_steps
      )
    if min(segments.lipschitz, product.lipschitz) < found * (1 - 1e-5):
      raise SystemExit(f'{name}: a certificate is below a Jacobian norm found: unsound')
    results[name] = {
      'model': repr(model),
      'found': found,
      'segments': segments.lipschitz,
      'product': product.lipschitz,
      'segments_over_found': segments.lipschitz / found,
      'product_over_found': product.lipschitz / found,
      'segments_exact': sum(s.exact for s in segments.segments),
      'segments_total': len(segments.segments),
      'seconds': time.perf_counter() - t0,
    }
    r = results[name]
    rows.append([name, f'{r["segments_exact"]}/{r["segments_total"]}', found, r['segments'],
                 r['segments_over_found'], r['product'], r['product_over_found']])  # fmt: skip
    print(f'{name}: done in {r["seconds"]:.0f}s', flush=True)
  headers = ['model', 'exact segs', 'found', 'segments', 'seg/found', 'product', 'prod/found']
  print(f'\nDevice: {bu.describe(info)}; LMT-trained {steps} steps on digits')
  print(bu.format_table(headers, rows))
  out = {'benchmark': 'lmt_tightness', 'device': info, 'settings': vars(args), 'models': results}
  bu.save_results(out, args.out, 'lmt_tightness')
  return out


if __name__ == '__main__':
  main()
