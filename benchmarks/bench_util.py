"""Helpers shared by the benchmark scripts: device description, timing, tables, JSON output."""

import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import flax
import jax
import numpy as np
import optax


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {
    'device_kind': dev.device_kind,
    'platform': dev.platform,
    'device_count': jax.device_count(),
    'jax_version': jax.__version__,
    'flax_version': flax.__version__,
    'optax_version': optax.__version__,
    'numpy_version': np.__version__,
    'python': platform.python_version(),
    'host_cpus': os.cpu_count(),
  }
  with contextlib.suppress(OSError):
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['host_cpu'] = line.split(':', 1)[1].strip()
          break
  with contextlib.suppress(OSError):
    info['load_average'] = os.getloadavg()
  return info


def describe(info: dict) -> str:
  host = f', host {info.get("host_cpu", "?")} x{info["host_cpus"]}'
  return f'{info["device_kind"]} ({info["platform"]}), jax {info["jax_version"]}{host}'


def timed(fn: Callable, *args):
  """(fn(*args), seconds), blocking until the result is ready."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def interleaved_times(fns: dict, init: dict, repeats: int, k: int, advance: bool) -> dict:
  """Median-ready per-call times: {name: [seconds per call, one per repeat]}.

  Each repeat runs every function `k` times (rotating which goes first) and blocks at the end.
  With `advance`, a function's output replaces its first argument (a train step's state).
  """
  args = dict(init)
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      fn, a = fns[name], args[name]
      t0 = time.perf_counter()
      for _ in range(k):
        out = fn(*a)
        if advance:
          a = (out[0], *a[1:])
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / k)
      args[name] = a
  return times


def calls_per_repeat(fn: Callable, args: tuple, k: int, min_repeat_s: float) -> int:
  """`k`, raised (up to 1000) so that k calls of a warm `fn` last at least `min_repeat_s`."""
  if min_repeat_s <= 0:
    return k
  _, once = timed(fn, *args)
  return max(k, min(1000, math.ceil(min_repeat_s / max(once, 1e-9))))


def summary(times: list[float]) -> dict:
  ms = [1e3 * t for t in times]
  return {'median_ms': statistics.median(ms), 'min_ms': min(ms), 'times_ms': ms}


def fmt(x) -> str:
  if isinstance(x, bool):
    return 'yes' if x else 'no'
  if isinstance(x, float):
    if math.isinf(x) or math.isnan(x):
      return str(x)
    if x == 0 or 0.01 <= abs(x) < 1e5:
      return f'{x:.3f}' if abs(x) < 10 else f'{x:.1f}'
    return f'{x:.3g}'
  return str(x)


def format_table(headers: list[str], rows: list[list]) -> str:
  cells = [list(headers)] + [[fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = [
    '  '.join(
      c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    for r in cells
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def write_json(path: str, out: dict) -> None:
  """Writes `out` to `path` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, path)
  print(f'\nwrote {os.path.normpath(path)}')


def record(name: str, info: dict, args, **fields) -> dict:
  """A benchmark's JSON record: its name, ok, the device, the settings (the parsed arguments
  but --out), then `fields`."""
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  head = {'benchmark': name, 'ok': True, 'device': info, 'device_description': describe(info)}
  return {**head, 'settings': settings, **fields}


def save_results(out: dict, path: str | None, name: str) -> None:
  """Writes `out` to `path`; None means benchmarks/results/{name}_{platform}.json, '' nowhere."""
  if path is None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, 'results', f'{name}_{out["device"]["platform"]}.json')
  if path:
    write_json(path, out)


def fail(what: str, failures: list[str]) -> None:
  """Prints the failed correctness check and exits with status 1 (no timings reported)."""
  print(f'\n{what} check FAILED; no timings are reported.')
  for f in failures:
    print(f'  {f}')
  raise SystemExit(1)
