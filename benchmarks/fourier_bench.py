r"""Fourier heat-map benchmark: the batched heat map against the batched-inference limit and
against a reference-style loop (one frequency per pass over the images).

  PYTHONPATH=. python benchmarks/fourier_bench.py --out=benchmarks/results/fourier_bench_cpu.json

One call (the small CNN without batch norm, random weights, on --hw x --hw x 3 images; synthetic
uniform images unless --dataset gives real ones; labels are the model's clean predictions, so an
error is a flipped prediction; every one of the H * W directions, random-sign mode):

0. Correctness (first; the benchmark refuses to report if it fails, exit status 1): the batched
   `fourier.heat_map` must equal the loop below exactly in its error rates (they are counts over
   the same images with the same signs, `fourier.image_signs`) and to a relative 1e-4 in its
   mean losses (summation order differs), and the map must not be degenerate (some direction
   must flip some prediction, at --eps).
1. The limit: the jitted per-image work of the heat map without the perturbation (model
   forward, argmax, log-softmax loss, sums) at each of --batch_sizes; the best images/s sets
   limit = H * W * N / best, the time of the same number of forward passes at the model's best
   batch size.
2. The batched heat map (`fourier.heat_map`, one jit) for each --configs chunk x batch (chunk
   directions vmapped, batch images scanned); compile excluded; median over --repeats.
3. The reference-style loop: for each frequency in turn, one pass over the images in batches of
   the best inference batch size, a jitted call per batch (perturbation, forward, argmax, loss),
   as the reference heat-map codes do (they loop over frequencies in Python); compile excluded;
   one timed run (it is the long one).

Reported: heat map / limit (>= 1; 1 is the limit), limit / heat map (fraction of the limit), and
loop / heat map (the speed-up over the loop). Absolute times only with the device line.
"""

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import data, fourier, models  # noqa: E402

LOSS_RTOL = 1e-4


def _config(text: str) -> tuple[int, int]:
  try:
    chunk, batch = (int(a) for a in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'a config is CHUNKxBATCH such as 64x256, got {text!r}'
    ) from None
  if chunk < 1 or batch < 1:
    raise argparse.ArgumentTypeError(f'chunk and batch must be positive, got {text!r}')
  return chunk, batch


def _ints(text: str) -> list[int]:
  try:
    values = [int(a) for a in text.split(',')]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected positive integers, got {text!r}')
  return values


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--hw', type=int, default=32, help='image height and width')
  p.add_argument('--images', type=int, default=0, help='images N (0: 10000 on GPU, 128 on CPU)')
  p.add_argument('--dataset', default='', help='take the first N test images of this dataset')
  p.add_argument('--eps', type=float, default=4.0, help='L2 norm of each direction')
  p.add_argument(
    '--configs',
    type=lambda s: [_config(a) for a in s.split(',')],
    default=None,
    help='heat-map CHUNKxBATCH settings (default: 16x128,64x128 on CPU, 8x1000,32x1000,'
    '64x500 on GPU)',
  )
  p.add_argument('--batch_sizes', type=_ints, default=None, help='inference batch sizes')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true', help='tiny settings for the tests')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/...)')
  args = p.parse_args(argv)
  if args.hw < 2 or args.images < 0 or args.repeats < 1 or args.eps <= 0:
    p.error('need --hw >= 2, --images >= 0, --repeats >= 1 and --eps > 0')
  if args.dataset:
    try:
      data.validate_name(args.dataset)
    except (ValueError, FileNotFoundError) as e:
      p.error(f'--dataset: {e}')
  return args


def _settings(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
  s = argparse.Namespace(**vars(args))
  if s.smoke:
    s.hw, s.images, s.repeats = 8, s.images or 32, 1
    s.configs = s.configs or [(16, 16), (64, 32)]
    s.batch_sizes = s.batch_sizes or [16, 32]
  s.images = s.images or (10_000 if on_gpu else 128)
  s.configs = s.configs or (
    [(8, 1000), (32, 1000), (64, 500)] if on_gpu else [(16, 128), (64, 128)]
  )
  s.batch_sizes = s.batch_sizes or ([256, 1024, 4096, 16384] if on_gpu else [64, 128, 256, 1024])
  s.batch_sizes = [b for b in s.batch_sizes if b <= s.images] or [s.images]
  return s


def _images(s: argparse.Namespace) -> np.ndarray:
  if s.dataset:
    x, _ = data.load(s.dataset, 'test')
    if x.shape[1:3] != (s.hw, s.hw) or len(x) < s.images:
      raise SystemExit(
        f'--dataset {s.dataset}: test images {x.shape} do not give {s.images} of {s.hw}x{s.hw}'
      )
    return np.asarray(x[: s.images], np.float32)
  rng = np.random.default_rng(s.seed)
  return rng.uniform(size=(s.images, s.hw, s.hw, 3)).astype(np.float32)


def _loop_heat_map(logits_fn, x, y, eps, key, batch):
  """One frequency per pass over the images, a jitted call per batch (the reference style)."""
  n, h, w, c = x.shape
  n = n // batch * batch
  dirs = fourier.basis((h, w), fourier.all_frequencies((h, w)))

  @jax.jit
  def step(xb, yb, d, sb):
    z = jnp.clip(xb + eps * sb[:, None, None, None] * d[None, :, :, None] / np.sqrt(c), 0, 1)
    logits = logits_fn(z)
    wrong = jnp.sum(jnp.argmax(logits, -1) != yb)
    loss = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1))
    return wrong, loss

  def run():
    err, los = np.zeros(h * w), np.zeros(h * w)
    for k in range(h * w):
      signs = fourier.image_signs(k, n, key=key)
      outs = [
        step(x[i : i + batch], y[i : i + batch], dirs[k], signs[i : i + batch])
        for i in range(0, n, batch)
      ]
      err[k] = sum(int(o[0]) for o in outs) / n
      los[k] = sum(float(o[1]) for o in outs) / n
    return err.reshape(h, w), los.reshape(h, w)

  step(x[:batch], y[:batch], dirs[0], jnp.ones(batch))  # compile outside the timing
  t0 = time.perf_counter()
  out = run()
  return out, time.perf_counter() - t0


def _inference(logits_fn, x, y, batch_sizes, repeats):
  @jax.jit
  def infer(xb, yb):
    logits = logits_fn(xb)
    wrong = jnp.sum(jnp.argmax(logits, -1) != yb)
    return wrong, -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1))

  rows = {}
  for b in batch_sizes:
    xb, yb = jnp.asarray(x[:b]), jnp.asarray(y[:b])
    bu.timed(infer, xb, yb)  # compile
    calls = bu.calls_per_repeat(infer, (xb, yb), 1, 0.5)
    times = bu.interleaved_times({b: infer}, {b: (xb, yb)}, repeats, calls, advance=False)[b]
    rows[b] = {**bu.summary(times), 'images_per_s': b / statistics.median(times)}
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  s = _settings(args, info['platform'] == 'gpu')
  print(f'fourier_bench on {bu.describe(info)}', flush=True)
  model = models.CNN(10, (32, 64), 256, batch_norm=False)
  x = _images(s)
  variables = model.init(jax.random.key(s.seed), jnp.asarray(x[:1]))
  logits_fn = jax.jit(lambda z: model.apply(variables, z, train=False))
  y = np.concatenate(
    [np.asarray(jnp.argmax(logits_fn(x[i : i + 256]), -1)) for i in range(0, len(x), 256)]
  )
  key = jax.random.key(s.seed + 1)
  k_dirs = s.hw * s.hw
  n = len(x)
  print(f'{n} images of {s.hw}x{s.hw}x3, {k_dirs} directions, L2 {s.eps:g}', flush=True)

  infer = _inference(logits_fn, x, y, s.batch_sizes, s.repeats)
  best_b = max(infer, key=lambda b: infer[b]['images_per_s'])
  best_rate = infer[best_b]['images_per_s']

  (loop_err, loop_loss), loop_s = _loop_heat_map(logits_fn, jnp.asarray(x), y, s.eps, key, best_b)
  used_loop = n // best_b * best_b

  heat, failures = {}, []
  for chunk, batch in s.configs:
    batch = min(batch, n)
    used = n // batch * batch
    fn = functools.partial(
      fourier.heat_map, logits_fn, x, y, s.eps, key=key, chunk=chunk, batch=batch
    )
    (err, loss), compile_s = bu.timed(fn)
    times = [bu.timed(fn)[1] for _ in range(s.repeats)]
    name = f'{chunk}x{batch}'
    heat[name] = {
      **bu.summary(times),
      'chunk': chunk,
      'batch': batch,
      'images_used': used,
      'compile_and_first_call_s': compile_s,
    }
    if used == used_loop:  # the same images: the maps must agree
      err, loss = np.asarray(err[0]), np.asarray(loss[0])
      if not np.array_equal(err, loop_err):
        failures.append(
          f'{name}: error rates differ from the loop at {int((err != loop_err).sum())} directions'
        )
      rel = float(np.max(np.abs(loss - loop_loss) / np.maximum(np.abs(loop_loss), 1e-30)))
      heat[name]['max_rel_loss_vs_loop'] = rel
      if rel > LOSS_RTOL:
        failures.append(f'{name}: mean loss differs from the loop by {rel:.2e} (> {LOSS_RTOL})')
      heat[name]['equals_loop'] = rel <= LOSS_RTOL and np.array_equal(err, loop_err)
  if not any('equals_loop' in r for r in heat.values()):
    failures.append(f"no config used the loop's {used_loop} images: nothing was compared")
  if not loop_err.max() > 0:
    failures.append(f'degenerate: no direction flips any prediction at L2 {s.eps:g}')
  if failures:
    bu.fail('Heat map equals loop', failures)

  limit_s = k_dirs * n / best_rate
  print(f'\nDevice: {bu.describe(info)}; load average at start {info.get("load_average", "?")}')
  print('\nBatched inference (the limit is the best row):')
  print(
    bu.format_table(
      ['batch', 'ms', 'images/s'],
      [[b, r['median_ms'], r['images_per_s']] for b, r in infer.items()],
    )
  )
  rows = []
  for name, r in heat.items():
    sec = r['median_ms'] / 1e3
    scaled_limit = k_dirs * r['images_used'] / best_rate
    r['over_limit'] = sec / scaled_limit
    r['fraction_of_limit'] = scaled_limit / sec
    r['loop_over_heat_map'] = (loop_s / used_loop) / (sec / r['images_used'])
    rows.append([name, sec, scaled_limit, r['over_limit'], r['fraction_of_limit'],
      r['loop_over_heat_map'], r.get('equals_loop', '-')])  # fmt: skip
  print(f'\nHeat map, all {k_dirs} directions x N images (loop: {loop_s:.2f} s on {used_loop}):')
  print(
    bu.format_table(
      ['chunk x batch', 's', 'limit s', 'heat/limit', 'of limit', 'loop/heat', '= loop'], rows
    )
  )
  best = min(heat, key=lambda k: heat[k]['over_limit'])
  print(
    f'\nbest {best}: {heat[best]["fraction_of_limit"]:.2f} of the batched-inference limit, '
    f'{heat[best]["loop_over_heat_map"]:.2f}x the reference-style loop'
  )
  out = bu.record(
    'fourier_bench', info, s, directions=k_dirs, images=n,
    inference={str(b): r for b, r in infer.items()}, best_inference_batch=best_b,
    limit_s=limit_s, loop={'seconds': loop_s, 'batch': best_b, 'images_used': used_loop},
    heat_map=heat, best_config=best,
  )  # fmt: skip
  bu.save_results(out, args.out, 'fourier_bench')
  return out


if __name__ == '__main__':
  main()
