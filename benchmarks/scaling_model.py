r"""Expected data-parallel step times at 8, 64 and 256 devices, from the cost model and a measured
single-device step: the LMT CIFAR-10 WideResNet and the VGC CIFAR-10 CNN.

  PYTHONPATH=. python benchmarks/scaling_model.py --out=benchmarks/results/scaling_model_cpu.json

Scaling cannot be measured on a 2-core machine, so it is modelled (`tsuzuku_jax.vgc.cost_model`:
ring all-reduce / all-gather, alpha-beta, no overlap of communication with compute) with the
per-device batch fixed (weak scaling), from single-device times measured here:

- LMT, WRN-16-4 on 32x32x3 (`models.WideResNet`): the LMT train step (pairwise margin loss,
  one power iteration per linear segment) as `lmt_bench.py` measured it on the same device
  (--lmt_bench_json: its WRN `train_step.lmt.median_ms`, at its batch size; the accelerator
  suite passes the record it has just written). Its exchange is the dense gradient: 4 bytes
  per parameter, ring all-reduce (the power-iteration vectors are computed alike on every
  device and never sent).
- VGC, the CIFAR-10 CNN of `experiments/configs/vgc_cifar10.flags` (conv 32-64, dense 256):
  forward + backward, the cheap variance estimate and the VGC compression step, measured by
  `cost_model.measure_worker_times` at --batch_size per device. Dense: ring all-reduce of the
  gradient; VGC: all-gather of each device's message at --vgc_ratio (ideal bytes; default
  102x, what VGC alpha 2 reached on CIFAR-10 in docs/vgc.md).

Interconnects (STATED, not measured): within one node of 8 devices, NVLink-class 3.6 Tbit/s
per device and 5 us per message; across nodes (64 and 256 devices), 400 Gbit/s per device
(InfiniBand NDR) and 25 us; and a slow case, 100 Gbit/s Ethernet and 25 us at every size. A
flat ring over all devices (no hierarchy): at 256 devices its 2 (n - 1) latency terms are
what a hierarchical all-reduce would cut.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import models, train_lib  # noqa: E402
from tsuzuku_jax.vgc import cost_model  # noqa: E402
from tsuzuku_jax.vgc import data_parallel as dp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = (8, 64, 256)
# (name, Gbit/s per device, latency s) by device count: STATED interconnects, not measured.
NETWORKS = {
  'fast': lambda n: (
    ('NVLink 3.6 Tbit/s', 3600.0, 5e-6) if n <= 8 else ('IB 400 Gbit/s', 400.0, 25e-6)
  ),
  'slow': lambda n: ('Ethernet 100 Gbit/s', 100.0, 25e-6),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch_size', type=int, default=128, help='per-device batch (weak scaling)')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--lmt_bench_json', default=os.path.join(HERE, 'results', 'lmt_bench_cpu.json'),
                 help="lmt_bench's record holding the WRN LMT step")  # fmt: skip
  p.add_argument('--vgc_ratio', type=float, default=102.0, help='VGC ideal byte ratio')
  p.add_argument('--smoke', action='store_true', help='a tiny WRN and batch (the tests)')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/...)')
  args = p.parse_args(argv)
  if args.smoke:
    args.batch_size, args.repeats = 8, 2
  return args


def lmt_step(path: str) -> dict:
  """The WRN's parameter count and LMT train step from lmt_bench's record at `path`."""
  with open(path) as f:
    wrn = json.load(f)['models']['wrn']
  return {'params': wrn['params'], 'step_ms': wrn['train_step']['lmt']['median_ms'],
          'batch_size': wrn['batch_size'], 'source': path}  # fmt: skip


def vgc_step(args) -> dict:
  """The VGC CIFAR-10 CNN's parameter count and its measured per-worker times (ms)."""
  model = models.CNN(10, (32, 64), 256, batch_norm=False)
  key = jax.random.key(0)
  batch = {'image': jax.random.uniform(key, (args.batch_size, 32, 32, 3)),
           'label': jax.random.randint(key, (args.batch_size,), 0, 10)}  # fmt: skip
  params = model.init(key, batch['image'][:1])['params']

  def loss_fn(p, b):
    logits = model.apply({'params': p}, b['image'])
    return train_lib.cross_entropy(logits, b['label']), jnp.mean(jnp.argmax(logits, -1) == 0)

  config = dp.DPConfig(method='vgc', workers=1, batch_size=args.batch_size)
  times = cost_model.measure_worker_times(loss_fn, params, batch, config, repeats=args.repeats)
  count = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  return {'params': count, 'batch_size': args.batch_size,
          **{k.replace('t_', '') + '_ms': 1e3 * v for k, v in times.items()}}  # fmt: skip


def rows(lmt: dict, vgc: dict, ratio: float) -> list[dict]:
  out = []
  for at in NETWORKS.values():
    for n in DEVICES:
      name, gbit, latency = at(n)
      bw = gbit * cost_model.GBIT
      d = 4 * lmt['params']
      t_ar = cost_model.ring_allreduce_time(d, n, bw, latency) * 1e3
      out.append({'model': 'LMT WRN', 'network': name, 'devices': n,
                  'compute_ms': lmt['step_ms'], 'exchange_ms': t_ar,
                  'step_ms': lmt['step_ms'] + t_ar, 'method': 'dense'})  # fmt: skip
      d = 4 * vgc['params']
      m = cost_model.StepModel(
        d, d / ratio, n, vgc['compute_ms'] / 1e3, vgc['compress_ms'] / 1e3,
        vgc['variance_ms'] / 1e3, latency,
      )  # fmt: skip
      t = cost_model.step_times(m, bw)
      for method, total, comm in (('dense', t['t_dense_step'], t['t_allreduce']),
                                  ('vgc', t['t_compressed_step'], t['t_allgather'])):  # fmt: skip
        out.append({'model': 'VGC CNN', 'network': name, 'devices': n, 'method': method,
                    'compute_ms': (total - comm) * 1e3, 'exchange_ms': comm * 1e3,
                    'step_ms': total * 1e3})  # fmt: skip
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  info = bu.device_info()
  print(f'Device: {bu.describe(info)}')
  lmt, vgc = lmt_step(args.lmt_bench_json), vgc_step(args)
  table = rows(lmt, vgc, args.vgc_ratio)
  print(f'\nLMT WRN-16-4: {lmt["params"]:,} parameters, one-device '
        f'step {lmt["step_ms"]:.1f} ms at batch {lmt["batch_size"]} ({lmt["source"]})')  # fmt: skip
  print(f'VGC CNN: {vgc["params"]:,} parameters, batch {vgc["batch_size"]}: forward + backward '
        f'{vgc["compute_ms"]:.1f} ms, variance +{vgc["variance_ms"]:.1f} ms, compress '
        f'{vgc["compress_ms"]:.1f} ms, byte ratio {args.vgc_ratio:g}x')  # fmt: skip
  print(
    'Expected step times (per-device batch fixed; STATED interconnects, flat ring, no overlap):'
  )
  head = ['model', 'method', 'network', 'devices', 'compute ms', 'exchange ms', 'step ms',
          'vs 1 device']  # fmt: skip
  one = {
    ('LMT WRN', 'dense'): lmt['step_ms'],
    ('VGC CNN', 'dense'): vgc['compute_ms'],
    ('VGC CNN', 'vgc'): vgc['compute_ms'] + vgc['variance_ms'] + vgc['compress_ms'],
  }
  for r in table:
    r['over_one_device'] = r['step_ms'] / one[(r['model'], r['method'])]
  print(bu.format_table(head, [[r['model'], r['method'], r['network'], r['devices'],
                                r['compute_ms'], r['exchange_ms'], r['step_ms'],
                                r['over_one_device']] for r in table]))  # fmt: skip
  out = bu.record('scaling_model', info, args, lmt=lmt, vgc=vgc, rows=table)
  bu.save_results(out, args.out, 'scaling_model')
  return out


if __name__ == '__main__':
  main()
