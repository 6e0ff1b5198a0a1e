r"""Accelerator suite: every benchmark at accelerator settings in one process, one table of the
ratios to quote and one JSON file.

  PYTHONPATH=. python benchmarks/accelerator_suite.py            # on the GPU (about 6 minutes)
  PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/accelerator_suite.py --smoke   # CPU check

Output folder: $OUT when that variable is set (the device tool brings back what is written
there), else --out_dir. It holds suite.json (device, settings, per-benchmark status and seconds,
the table's rows; rewritten after every benchmark, so a run killed part-way keeps what it did)
and each benchmark's own JSON. All data are synthetic: no dataset is staged (../shared/data is
not needed), and neither tensorflow_datasets nor orbax is imported.

Runs, cheapest of the most wanted first (each through its script's `main(argv)`; settings are
the script's own accelerator defaults but where stated):

1. lmt: `lmt_bench.py --models=mlp,cnn` (batch 128, 15 repeats, GloRo too).
2. vgc: `vgc_bench.py` (compress sizes 1M, 16M, 64M; variance cost of the MLP and the CNN).
3. flatness: `flatness_bench.py --torch=auto` (MLP and CNN, batch 128, 16 probes; the PyTorch
   peer where torch imports, on the GPU).
4. fourier: `fourier_bench.py --images=10000 --batch_sizes=1000,2000,5000,10000` (heat-map
   configs 8x1000, 32x1000, 64x500). The inference batch sizes divide 10,000 so that the
   reference-style loop (which runs whole batches of the best inference size) covers the same
   images as the heat map: the bench compares the two maps and refuses to report when no
   config used the loop's images (its GPU default 256, 1024, 4096 would leave 10,000 - 8,192
   unused). The loop is not capped (the bench has no cap, and the comparison needs it): 1,024
   directions x 10,000 images in at most 10 jitted calls each, seconds on an H200.
5. lmt_wrn: `lmt_bench.py --models=wrn --gloro=none` (WRN-16-4 at batch 128; GloRo left out
   to save its compilation).
6. scaling: `scaling_model.py` (the one-device LMT WRN step that lmt_wrn measured, and the VGC
   CIFAR-10 CNN step measured here, at batch 128; the modelled step at 8, 64 and 256 devices,
   stated interconnects).

`--smoke` gives every script its own `--smoke` (tiny models, seconds each on a CPU), with the
same figures but fewer of what gives none (no GloRo, one compress size, VGC alone).
Before each benchmark, if the time so far plus its rough expected time (EXPECTED_S) exceeds
--budget_s, it is skipped ('time budget'). A benchmark that raises or exits is recorded with
its one line and the rest still run; the exit status is 1 if any failed. On an accelerator, a
benchmark whose correctness check fails at the default matmul precision (TF32 on a GPU, while
the checks have float32 tolerances) is run once more at 'highest' precision (PyTorch's TF32
off too), and the table says so; a flatness run that fails with the PyTorch peer is rerun
once without it (`--torch=no`), so that a problem of torch beside JAX on the GPU costs the
peer's two figures only. Retries are made only when they fit the budget.
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

import jax  # noqa: E402

from benchmarks import bench_util as bu  # noqa: E402

DEFAULT_OUT_DIR = os.path.normpath(os.path.join(_ROOT, 'benchmarks', 'results', 'accelerator'))
# Rough seconds per benchmark on an H200 (compilation included), and with --smoke on a CPU.
EXPECTED_S = {'lmt': 45, 'vgc': 45, 'flatness': 45, 'fourier': 90, 'lmt_wrn': 120, 'scaling': 30}
SMOKE_EXPECTED_S = 15
ORDER = ('lmt', 'vgc', 'flatness', 'fourier', 'lmt_wrn', 'scaling')
LMT_MODELS = {'lmt': ('mlp', 'cnn'), 'lmt_wrn': ('wrn',)}
VGC_MODELS = FLATNESS_MODELS = ('mlp', 'cnn')


def expected_s(name: str, smoke: bool) -> float:
  return SMOKE_EXPECTED_S if smoke else EXPECTED_S[name]


def plan(smoke: bool) -> dict[str, tuple[str, list[str]]]:
  """{name: (benchmark script module, argv without --out)}, in ORDER."""
  if smoke:
    return {
      # GloRo, the smaller sizes and the other compressors are no figure here: left out.
      'lmt': ('lmt_bench', ['--smoke', '--models=mlp,cnn', '--gloro=none']),
      'vgc': ('vgc_bench', ['--smoke', '--sizes=4096', '--methods=vgc']),
      'flatness': ('flatness_bench', ['--smoke', '--models=mlp,cnn', '--torch=auto']),
      'fourier': ('fourier_bench', ['--smoke']),
      'lmt_wrn': ('lmt_bench', ['--smoke', '--models=wrn', '--gloro=none']),
      'scaling': ('scaling_model', ['--smoke']),
    }
  return {
    'lmt': ('lmt_bench', ['--models=mlp,cnn']),
    'vgc': ('vgc_bench', []),
    'flatness': ('flatness_bench', ['--models=mlp,cnn', '--torch=auto']),
    'fourier': ('fourier_bench', ['--images=10000', '--batch_sizes=1000,2000,5000,10000']),
    'lmt_wrn': ('lmt_bench', ['--models=wrn', '--gloro=none']),
    'scaling': ('scaling_model', []),
  }


def dig(record: dict, *path):
  """record[path[0]][path[1]]...; KeyError naming the dotted path when any part is missing."""
  node = record
  for p in path:
    if not isinstance(node, dict) or p not in node:
      raise KeyError(f'no {".".join(map(str, path))} in its JSON')
    node = node[p]
  return node


# Per benchmark: (figure name, getter of the value from the bench's returned dict, ratio of).
Figure = tuple[str, Callable[[dict], float], str]


def _certify_over_infer(r: dict, m: str) -> float:
  rate = lambda which: dig(r, 'models', m, 'certification', which, 'images_per_s')
  return rate('certify') / rate('plain')


def _lmt_figures(models) -> list[Figure]:
  out = []
  for m in models:
    out += [
      (f'lmt {m}: LMT/plain step',
       lambda r, m=m: dig(r, 'models', m, 'train_step', 'lmt', 'ratio_to_plain_paired_median'),
       'LMT train step / plain cross-entropy step (median of paired repeats)'),
      (f'lmt {m}: certify/infer rate', lambda r, m=m: _certify_over_infer(r, m),
       'certification images/s / plain inference images/s, same batch'),
    ]  # fmt: skip
  return out


def _largest_vgc(r: dict) -> float:
  return dig(r, 'compress', str(max(dig(r, 'settings', 'sizes'))), 'vgc', 'ratio_to_floor')


def _fourier(r: dict, key: str) -> float:
  return dig(r, 'heat_map', dig(r, 'best_config'), key)


def _torch_ratio(r: dict, m: str) -> float:
  if 'torch' not in dig(r, 'models', m):
    raise KeyError('PyTorch peer not run')
  return dig(r, 'models', m, 'torch', 'double_backward_over_ours')


def _at_256(r: dict, model: str, method: str) -> float:
  key = lambda x: (x['model'], x['method'], x['devices'], x['network'].startswith('IB'))  # noqa: E731
  rows = [x for x in dig(r, 'rows') if key(x) == (model, method, 256, True)]
  if not rows:
    raise KeyError(f'no {model} {method} row at 256 devices in its JSON')
  return rows[0]['over_one_device']


FIGURES: dict[str, list[Figure]] = {
  'lmt': _lmt_figures(LMT_MODELS['lmt']),
  'vgc': [
    ('vgc: compress/floor', _largest_vgc,
     'VGC compress step / memory floor (24 B per element at the copy bandwidth), largest size'),
    *[(f'vgc {m}: variance/backward',
       lambda r, m=m: dig(r, 'variance', m, 'cheap_extra_over_backward'),
       'variance.cheap extra time / backward pass: (b - a) / (a - f)') for m in VGC_MODELS],
  ],
  'flatness': [
    fig for m in FLATNESS_MODELS for fig in (
      (f'flatness {m}: hvp/grad', lambda r, m=m: dig(r, 'models', m, 'hvp_over_grad'),
       'one HVP (forward over reverse) / one gradient, same loss and batch'),
      (f'flatness {m}: torch/ours hvp', lambda r, m=m: _torch_ratio(r, m),
       'PyTorch double-backward HVP / our HVP, same weights and batch'),
    )
  ],
  'fourier': [
    ('fourier: heat map/limit', lambda r: _fourier(r, 'over_limit'),
     'batched heat map (best chunk x batch) / batched-inference limit, H*W directions x N images'),
    ('fourier: loop/heat map', lambda r: _fourier(r, 'loop_over_heat_map'),
     'reference-style loop (a jitted call per frequency and batch) / batched heat map, per image'),
  ],
  'lmt_wrn': _lmt_figures(LMT_MODELS['lmt_wrn']),
  'scaling': [
    (f'scaling: {model} {method} at 256 devices', lambda r, k=(model, method): _at_256(r, *k),
     'modelled step / one-device step (InfiniBand 400 Gbit/s, flat ring)')
    for model, method in (('LMT WRN', 'dense'), ('VGC CNN', 'dense'), ('VGC CNN', 'vgc'))
  ],
}  # fmt: skip


class _Tee:
  """Writes through to `stream` and keeps the last `keep` characters (for the failure line)."""

  def __init__(self, stream, keep: int = 20_000):
    self.stream, self.keep, self.text = stream, keep, ''

  def write(self, s: str) -> int:
    self.text = (self.text + s)[-self.keep :]
    return self.stream.write(s)

  def flush(self) -> None:
    self.stream.flush()

  def __getattr__(self, name: str):  # isatty, encoding, fileno...: the stream's
    return getattr(self.stream, name)

  def lines(self) -> list[str]:
    return [line.strip() for line in self.text.splitlines() if line.strip()]


def _exit_line(e: SystemExit, printed: list[str]) -> str:
  """One line for a benchmark's SystemExit: its message, or its FAILED line and last line."""
  if isinstance(e.code, str):
    return e.code.splitlines()[0]
  failed = [line for line in printed if 'FAILED' in line]
  last = printed[-1] if printed else ''
  if failed:
    return failed[0] if failed[0] == last else f'{failed[0]} | {last}'
  return f'exit status {e.code}: {last}'


@contextlib.contextmanager
def full_precision():
  """float32 matmuls and convolutions at full precision: JAX's 'highest', and PyTorch's TF32
  off where torch is already imported (the flatness peer)."""
  torch = sys.modules.get('torch')
  saved = None
  if torch is not None:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    with jax.default_matmul_precision('highest'):
      yield
  finally:
    if saved is not None:
      torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load(module: str):
  return importlib.import_module(f'benchmarks.{module}')


def run_one(module: str, argv: list[str], precise: bool) -> tuple[dict | None, str, list[str]]:
  """(result, error line or '', printed lines) of one benchmark's main(argv)."""
  tee = _Tee(sys.stdout)
  ctx = full_precision() if precise else contextlib.nullcontext()
  try:
    with contextlib.redirect_stdout(tee), ctx:
      result = load(module).main(argv)
    return result, '', tee.lines()
  except SystemExit as e:
    if not e.code:
      return None, 'exited with status 0 before returning a result', tee.lines()
    return None, _exit_line(e, tee.lines()), tee.lines()
  except Exception as e:  # noqa: BLE001 - recorded in the table; the other benchmarks still run
    traceback.print_exc()
    text = str(e).strip().splitlines()
    return None, f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': '), tee.lines()


def platform() -> str:
  return jax.devices()[0].platform


def run_bench(
  name: str, module: str, argv: list[str], json_path: str, fits: Callable[[], bool]
) -> tuple[dict, dict | None]:
  """(status record, result or None). On an accelerator a failed correctness check is rerun
  once at full float32 precision; a flatness run that failed with the PyTorch peer is rerun
  once without it (its own figures are worth more than the peer's). `fits`: whether another
  attempt fits the time budget."""
  argv = [*argv, f'--out={json_path}']
  t0 = time.perf_counter()
  status = {'argv': argv, 'json': os.path.basename(json_path), 'precision': 'default'}
  result, error, printed = run_one(module, argv, precise=False)
  precise = False
  if result is None and 'FAILED' in error and platform() != 'cpu' and fits():
    print(f'\n[suite] {name}: {error}; rerunning at highest matmul precision', flush=True)
    status['default_precision_error'], status['precision'] = error, 'highest (default failed)'
    precise = True
    result, error, printed = run_one(module, argv, precise)
  if result is None and '--torch=auto' in argv and fits():
    print(f'\n[suite] {name}: {error}; rerunning without the PyTorch peer', flush=True)
    status['torch'] = f'PyTorch peer dropped after: {error}'
    argv = status['argv'] = [a if a != '--torch=auto' else '--torch=no' for a in argv]
    result, error, printed = run_one(module, argv, precise)
  status['seconds'] = time.perf_counter() - t0
  skipped = [line for line in printed if line.startswith('PyTorch peer skipped')]
  if skipped:
    status['torch'] = skipped[0]
  if result is None:
    return {**status, 'status': 'failed', 'error': error}, None
  return {**status, 'status': 'ok'}, result


def figure_rows(name: str, result: dict | None, status: dict) -> list[dict]:
  rows = []
  for fig, get, ratio_of in FIGURES[name]:
    row = {'bench': name, 'figure': fig, 'ratio_of': ratio_of}
    if result is None:
      rows.append({**row, 'value': 'n/a', 'reason': status.get('error') or status['reason']})
      continue
    try:
      value = float(get(result))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
      reason = str(e.args[0]) if e.args else type(e).__name__
      if 'PyTorch' in reason and 'torch' in status:
        reason = status['torch']
      rows.append({**row, 'value': 'n/a', 'reason': reason})
      continue
    if status['precision'] != 'default':
      row['note'] = 'at highest matmul precision'
    rows.append({**row, 'value': value})
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--smoke', action='store_true', help="every benchmark's own --smoke (seconds)")
  p.add_argument('--budget_s', type=float, default=420.0, help='skip what would end past this')
  p.add_argument('--benches', default=','.join(ORDER), help=f'comma-separated, from {ORDER}')
  p.add_argument('--out_dir', default=DEFAULT_OUT_DIR, help='output folder when $OUT is unset')
  args = p.parse_args(argv)
  args.benches = [b.strip() for b in args.benches.split(',') if b.strip()]
  bad = [b for b in args.benches if b not in ORDER]
  if bad or not args.benches:
    p.error(f'--benches: unknown {bad} (choose from {ORDER})')
  if args.budget_s <= 0:
    p.error(f'--budget_s must be positive, got {args.budget_s}')
  args.out_dir = os.environ.get('OUT') or args.out_dir
  return args


def _save(path: str, out: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, path)


def _value(row: dict):
  v = row['value']
  return v if isinstance(v, str) or math.isfinite(v) else str(v)


def _note(text: str | None) -> str:
  return f' [{text}]' if text else ''


def report(suite: dict) -> None:
  print(f'\n[suite] Device: {suite["device_description"]}')
  heads = ['benchmark', 'status', 'seconds', 'precision', 'note']
  rows = [
    [n, s['status'], s.get('seconds', '-'), s.get('precision', '-'),
     s.get('error') or s.get('reason') or s.get('torch', '')]
    for n, s in suite['benches'].items()
  ]  # fmt: skip
  print(bu.format_table(heads, rows))
  print('\nRatios to quote (absolute times only with the device line):')
  rows = [
    [r['figure'], bu.fmt(_value(r)), r['ratio_of'] + _note(r.get('reason') or r.get('note'))]
    for r in suite['rows']
  ]
  widths = [max(len(row[i]) for row in rows + [['figure', 'value']]) for i in range(2)]
  print(f'{"figure":<{widths[0]}}  {"value":>{widths[1]}}  ratio of')
  for fig, value, ratio_of in rows:
    print(f'{fig:<{widths[0]}}  {value:>{widths[1]}}  {ratio_of}')


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  os.makedirs(args.out_dir, exist_ok=True)
  info = bu.device_info()
  print(f'accelerator_suite on {bu.describe(info)}; output in {args.out_dir}', flush=True)
  steps = {n: s for n, s in plan(args.smoke).items() if n in args.benches}
  suite = {
    'suite': 'accelerator_suite', 'ok': True, 'device': info,
    'device_description': bu.describe(info),
    'settings': {'smoke': args.smoke, 'budget_s': args.budget_s, 'out_dir': args.out_dir},
    'benches': {n: {'status': 'pending', 'argv': argv} for n, (_, argv) in steps.items()},
    'rows': [],
  }  # fmt: skip
  path = os.path.join(args.out_dir, 'suite.json')
  _save(path, suite)
  for name, (module, bench_argv) in steps.items():
    if name == 'scaling':  # the WRN step lmt_wrn measured just before, on this device
      bench_argv = [*bench_argv, f'--lmt_bench_json={args.out_dir}/lmt_bench_wrn.json']
    elapsed = time.perf_counter() - t_start
    expected = expected_s(name, args.smoke)
    if elapsed + expected > args.budget_s:
      status, result = {'status': 'skipped', 'reason': 'time budget', 'expected_s': expected}, None
      print(f'\n[suite] {name}: skipped (time budget: {elapsed:.0f} s + ~{expected} s '
            f'> {args.budget_s:g} s)', flush=True)  # fmt: skip
    else:
      print(f'\n[suite] {name} ({module} {" ".join(bench_argv)}) at {elapsed:.0f} s', flush=True)
      json_path = os.path.join(args.out_dir, f'{module}{"_wrn" if name == "lmt_wrn" else ""}.json')
      fits = lambda: time.perf_counter() - t_start + expected <= args.budget_s  # noqa: B023
      status, result = run_bench(name, module, bench_argv, json_path, fits)
      status['expected_s'] = expected
    suite['benches'][name] = status
    suite['rows'] += figure_rows(name, result, status)
    suite['ok'] = suite['ok'] and status['status'] != 'failed'
    suite['total_s'] = time.perf_counter() - t_start
    _save(path, suite)  # after every benchmark: a run killed later keeps this
  report(suite)
  print(f'\n[suite] wrote {os.path.normpath(path)} in {suite["total_s"]:.0f} s', flush=True)
  return suite


if __name__ == '__main__':
  raise SystemExit(0 if main()['ok'] else 1)
