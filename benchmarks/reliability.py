r"""Workdir reliability: kill-and-restart at random moments, and bad inputs against a finished run.

  PYTHONPATH=. python benchmarks/reliability.py --out=benchmarks/results/reliability_cpu.json

1. Kill and restart (`kill_restart`): the LMT launcher on digits runs once uninterrupted (the
   reference), then, in a fresh workdir, the same command is started and killed with SIGKILL at
   a moment drawn uniformly from [0.5 s, --fraction x that start's expected duration], --kills
   times in a row (each start resumes what the last one left), then run to the end. Checked:
   both models' final parameters equal the reference's bit for bit (`params_fingerprint`, a
   digest of every parameter's bytes), so do all the reported numbers, each metrics.jsonl holds
   exactly the reference's logged steps (no duplicate, none missing), and results.json never
   exists after a kill (it is written once, atomically, at the end).
2. Bad inputs (`bad_inputs`): each one tried against a finished LMT workdir (the reference),
   by the launcher as a user would type it or by a library call; recorded: the exit status, the
   one-line message, and whether every file of the workdir has the same sha256 afterwards.

Prints both tables (the second as markdown for docs/workdir.md), writes JSON; exit status 1 when a
check fails.
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

from benchmarks import bench_util as bu  # noqa: E402
from tsuzuku_jax import workdir  # noqa: E402

LMT = os.path.join(_ROOT, 'experiments', 'lmt.py')
FOURIER = os.path.join(_ROOT, 'experiments', 'fourier.py')
FLAGFILE = os.path.join(_ROOT, 'experiments', 'configs', 'lmt_digits.flags')
# The `make demo` run (digits, 6000 steps) with a checkpoint every 500 steps and a shorter attack:
# training is most of its wall time, so most kills land in the middle of it.
FLAGS = [
  f'--flagfile={FLAGFILE}',
  '--log_every=250',
  '--checkpoint_every=500',
  '--pgd_restarts=1',
  '--attack_examples=200',
]
MODELS = ('lmt', 'baseline')


def _env() -> dict:
  # One device; the caller's compiler flags kept (the test suite's faster ones). No persistent
  # compilation cache: every start must compile as the timed reference run did, or the kill
  # moments drawn from its timeline would fall after a (faster) restart has finished.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags),
          'JAX_ENABLE_COMPILATION_CACHE': 'false'}  # fmt: skip


def launch(script: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
  """`python script args` as a user would run it (on the CPU)."""
  cmd = [sys.executable, script, *args]
  return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _steps(path: str) -> list[int]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip().endswith('}')]


def _numbers(results: dict) -> dict:
  """What a run reports, without its wall times."""
  drop = ('train_seconds',)
  return {m: {k: v for k, v in results[m].items() if k not in drop} for m in MODELS}


def _timed_run(args: list[str]) -> list[tuple[float, str]]:
  """Runs the launcher to the end; its stdout lines with the seconds since the start."""
  t0 = time.time()
  p = subprocess.Popen(
    [sys.executable, LMT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    env=_env(),
  )  # fmt: skip
  lines = [(time.time() - t0, line.rstrip()) for line in p.stdout]
  err = p.stderr.read()
  if p.wait():
    raise RuntimeError(f'reference run failed:\n{err[-3000:]}')
  return lines + [(time.time() - t0, '<exit>')]


def _phases(timeline, steps: int) -> dict:
  """From the reference's timeline: start-up (imports, data, the record) and, per model, when
  its training began (header line), when each logged step was reached, and its evaluation time
  (from its last step to the next model's header or the end)."""
  out = {'startup': None}
  for m in MODELS:
    out[m] = {'steps': {}}
  current = None
  for t, line in timeline:
    head = [m for m in MODELS if line.startswith(f'== training {m} ')]
    if head:
      if current:
        out[current]['eval'] = t - out[current]['steps'][steps]
      current = head[0]
      out[current]['steps'][0] = t
      out['startup'] = t if out['startup'] is None else out['startup']
    elif current and line.startswith('step '):
      out[current]['steps'][int(line.split()[1].split('/')[0])] = t
  out[current]['eval'] = timeline[-1][0] - out[current]['steps'][steps]
  return out


def _checkpoint(path: str) -> int:
  """The latest committed checkpoint step under `path`/checkpoints (0: none)."""
  folder = os.path.join(path, 'checkpoints')
  steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)


def _remaining(phases: dict, cut: str, steps: int) -> float:
  """Expected wall time of a start in `cut`, from the reference's phases: start-up, then per
  model its training from the checkpoint the start resumes from and its evaluation (a model
  already trained is evaluated again). Compilation after a resume is not counted, so this
  errs short: the kill lands before the end."""
  total = phases['startup']
  for m in MODELS:
    at = phases[m]['steps']
    total += at[steps] - at[_checkpoint(os.path.join(cut, m))] + phases[m]['eval']
  return total


def kill_restart(
  flags: list[str], root: str, kills: int, seed: int = 0, fraction: float = 0.5
) -> dict:
  """Reference run in ROOT/reference, then `kills` random kills and a final run in ROOT/killed.

  Each start is killed at a moment drawn uniformly from [0.5 s, fraction x its expected
  duration] (`_remaining`): the kills land in start-up, training, checkpointing and evaluation,
  and with fraction < 1 the run advances by small steps, so that a series of kills does not
  pass all of training in its first draw.
  """
  ref, cut = os.path.join(root, 'reference'), os.path.join(root, 'killed')
  timeline = _timed_run([*flags, f'--workdir={ref}'])
  t_ref = timeline[-1][0]
  steps = int(next(ln.split()[1].split('/')[1] for _, ln in timeline if ln.startswith('step ')))
  phases = _phases(timeline, steps)
  rng = random.Random(seed)
  events = []
  for i in range(kills):
    delay = rng.uniform(0.5, max(0.6, fraction * _remaining(phases, cut, steps)))
    p = subprocess.Popen(
      [sys.executable, LMT, *flags, f'--workdir={cut}'],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      env=_env(),
    )
    try:
      _, err = p.communicate(timeout=delay)
      killed = False
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
      killed = True
    if not killed and p.returncode:
      raise RuntimeError(f'restart {i} failed:\n{err.decode()[-3000:]}')
    events.append(
      {
        'kill_after_s': round(delay, 2),
        'killed': killed,
        'results_json_after': os.path.exists(os.path.join(cut, 'results.json')),
        'last_logged_step': {m: (_steps(os.path.join(cut, m, 'metrics.jsonl')) or [0])[-1]
                             for m in MODELS},
        'checkpoint': {m: _checkpoint(os.path.join(cut, m)) for m in MODELS},
      }
    )  # fmt: skip
    if not killed:
      break
  proc = launch(LMT, *flags, f'--workdir={cut}')
  if proc.returncode:
    raise RuntimeError(f'final run failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(ref, 'results.json')) as f:
    want = json.load(f)
  with open(os.path.join(cut, 'results.json')) as f:
    got = json.load(f)
  checks = {
    'params_bit_identical': all(
      got[m]['params_fingerprint'] == want[m]['params_fingerprint'] for m in MODELS
    ),
    'results_identical': _numbers(got) == _numbers(want),
    'metrics_steps_exact': all(
      _steps(os.path.join(cut, m, 'metrics.jsonl')) == _steps(os.path.join(ref, m, 'metrics.jsonl'))
      for m in MODELS
    ),
    'no_results_json_after_a_kill': not any(e['results_json_after'] for e in events if e['killed']),
    'kills_landed': sum(e['killed'] for e in events),
  }
  checks['all_kills_landed'] = checks['kills_landed'] == kills
  checks['ok'] = all(v for k, v in checks.items() if k != 'kills_landed')
  return {'reference_seconds': t_ref, 'events': events, 'checks': checks, 'flags': flags}


def _npz(path: str, mutate) -> str:
  """An npz copy of digits with `mutate(arrays)` applied; returns 'npz:PATH'."""
  import numpy as np

  from tsuzuku_jax import data

  (xtr, ytr), (xte, yte) = data.load('digits', 'train'), data.load('digits', 'test')
  arrays = {'x_train': xtr.copy(), 'y_train': ytr.copy(), 'x_test': xte, 'y_test': yte}
  mutate(arrays)
  np.savez(path, **arrays)
  return f'npz:{path}'


def _library_cases(finished: str) -> list[tuple[str, callable]]:
  """(description, call) pairs of library calls with bad input, on the finished run's model."""
  import jax
  import numpy as np

  from tsuzuku_jax import attacks, data, fourier, lmt, models, train_lib

  x, y = data.load('digits', 'test')
  model = models.MLP(10, hidden=(8,))
  variables = model.init(jax.random.key(0), x[:1])
  logits_fn = jax.jit(lambda z: model.apply(variables, z))
  cert = lmt.certificate(model.apply, variables, x.shape[1:])
  nan = x.copy()
  nan[3, 4, 5, 0] = np.nan
  over = x.copy()
  over[7, 0, 0, 0] = 1.5
  key = jax.random.key(0)
  # The finished LMT model's own training settings, with another learning rate.
  rec = workdir.read_run(os.path.join(finished, 'lmt'))['config']
  names = {f.name for f in dataclasses.fields(train_lib.TrainConfig)}
  config = train_lib.TrainConfig(**{k: v for k, v in rec.items() if k in names})
  config = dataclasses.replace(config, learning_rate=2 * config.learning_rate)
  lmt_model = models.MLP(10, hidden=tuple(rec['model']['hidden']))
  return [
    ('`lmt.certify_dataset` on a test set with one nan pixel',
     lambda: lmt.certify_dataset(model.apply, variables, cert, nan, y, [0.1])),
    ('`fourier.heat_map` on a test set with one nan pixel',
     lambda: fourier.heat_map(logits_fn, nan, y, 1.0, key=key)),
    ('`fourier.heat_map` on an image with a pixel at 1.5',
     lambda: fourier.heat_map(logits_fn, over, y, 1.0, key=key)),
    ('`attacks.pgd_l2` with a label 10 for a 10-class model',
     lambda: attacks.pgd_l2(logits_fn, x[:4], np.array([0, 1, 10, 2]), 0.1, key=key)),
    ('`train_lib.train` in the finished run\'s `lmt/` with another learning rate',
     lambda: train_lib.train(lmt_model, config, *data.load('digits', 'train'),
                             os.path.join(finished, 'lmt'), log=lambda s: None)),
  ]  # fmt: skip


def bad_inputs(finished: str, scratch: str, flags: list[str], only: int | None = None) -> list:
  """Tries each bad input against the finished LMT run in `finished`; one row per input."""
  os.makedirs(scratch, exist_ok=True)
  s = lambda name: os.path.join(scratch, name)  # noqa: E731

  def shifted(a):
    a['y_train'] = a['y_train'] + 100

  def negative(a):
    a['y_train'][5] = -1

  def over(a):
    a['x_train'][2, 3, 3, 0] = 1.2

  def nan(a):
    a['x_train'][2, 3, 3, 0] = float('nan')

  def one_pixel(a):
    a['x_train'][0, 0, 0, 0] = 0.5

  with open(s('corrupt.npz'), 'wb') as f:
    f.write(b'PK\x03\x04 not a zip archive')
  with open(s('a_file'), 'w') as f:
    f.write('not a directory')
  os.makedirs(s('foreign'), exist_ok=True)
  with open(s('foreign/notes.txt'), 'w') as f:
    f.write('my notes')
  w = f'--workdir={finished}'
  ds = lambda name, fn: f'--dataset={_npz(s(name), fn)}'  # noqa: E731
  cli = [
    ('a flag value that is not a number: `--steps=abc`', LMT, [w, '--steps=abc']),
    ('an enum flag outside its choices: `--model=resnet`', LMT, [w, '--model=resnet']),
    ('a misspelt flag: `--stepz=600`', LMT, [w, '--stepz=600']),
    ('an invalid value: `--c=0`', LMT, [w, '--c=0']),
    ('a malformed list: `--eps=0.1,abc`', LMT, [w, '--eps=0.1,abc']),
    ('a dataset file that does not exist', LMT, [w, '--dataset=npz:/no/such.npz']),
    ('an npz file that is not a zip archive', LMT, [w, f'--dataset=npz:{s("corrupt.npz")}']),
    ('npz labels 100..109', LMT, [w, ds('shifted.npz', shifted)]),
    ('an npz label -1', LMT, [w, ds('negative.npz', negative)]),
    ('an npz float image with a pixel at 1.2', LMT, [w, ds('over.npz', over)]),
    ('an npz float image with a nan pixel', LMT, [w, ds('nan.npz', nan)]),
    ('the finished run again with `--steps=700`', LMT, [w, '--steps=700']),
    ('the finished run again with `--learning_rate=0.01`', LMT, [w, '--learning_rate=0.01']),
    ('the finished run again on other data (digits, one pixel changed, as npz)', LMT,
     [w, ds('pixel.npz', one_pixel)]),
    ('`experiments/fourier.py` on the finished LMT workdir', FOURIER, [w]),
    ('`--workdir` under a file', LMT, [f'--workdir={s("a_file")}/run']),
    ('`--workdir` holding files but no run.json', LMT, [f'--workdir={s("foreign")}']),
  ]  # fmt: skip
  rows = []
  for what, script, args in cli[:only]:
    before = workdir.file_hashes(finished), workdir.file_hashes(scratch)
    proc = launch(script, *(flags if script == LMT else []), *args)
    after = workdir.file_hashes(finished), workdir.file_hashes(scratch)
    rows.append(
      {
        'input': what,
        'via': 'launcher',
        'exit_status': proc.returncode,
        'stderr_lines': len(proc.stderr.strip().splitlines()),
        'message': proc.stderr.strip(),
        'files_unchanged': before == after,
        'files_checked': len(before[0]) + len(before[1]),
      }
    )
  for what, call in _library_cases(finished)[:only]:
    before = workdir.file_hashes(finished)
    try:
      call()
      message = '(no error)'
    except ValueError as e:
      message = f'{type(e).__name__}: {e}'
    rows.append(
      {
        'input': what,
        'via': 'library',
        'exit_status': None,
        'stderr_lines': 1,
        'message': message,
        'files_unchanged': workdir.file_hashes(finished) == before,
        'files_checked': len(before),
      }
    )
  return rows


def row_ok(row: dict) -> bool:
  one_line = row['stderr_lines'] == 1 and '\n' not in row['message']
  failed = row['exit_status'] != 0 if row['via'] == 'launcher' else row['message'] != '(no error)'
  return one_line and failed and row['files_unchanged'] and 'Traceback' not in row['message']


def markdown(rows: list[dict], root: str) -> str:
  lines = ['| bad input | message (one line) | files unchanged |', '|---|---|---|']
  for r in rows:
    msg = r['message'].replace(root, 'RUNS').replace('|', '\\|')
    status = 'exit 2' if r['via'] == 'launcher' else 'raised'
    unchanged = f'yes ({r["files_checked"]} files, sha256)' if r['files_unchanged'] else 'NO'
    lines.append(f'| {r["input"]} | {status}: `{msg}` | {unchanged} |')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--fraction', type=float, default=0.5, help='kill before this x duration')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--flags', default='', help='extra launcher flags (space separated)')
  parser.add_argument('--only', type=int, default=None, help='first N bad inputs of each kind')
  parser.add_argument('--root', default=None, help='scratch folder (default: a temporary one)')
  parser.add_argument('--out', default=None, help="JSON path ('' for none)")
  args = parser.parse_args(argv)
  flags = FLAGS + args.flags.split()
  root = args.root or tempfile.mkdtemp(prefix='reliability-')
  info = bu.device_info()
  print(f'Device: {bu.describe(info)}')
  t0 = time.time()
  kr = kill_restart(flags, root, args.kills, args.seed, args.fraction)
  print(f'\nKill and restart ({kr["checks"]["kills_landed"]} kills, reference run '
        f'{kr["reference_seconds"]:.1f} s):')  # fmt: skip
  print(
    bu.format_table(
      [
        'start',
        'killed after s',
        'killed',
        'results.json',
        'logged lmt / baseline',
        'checkpoint lmt / baseline',
      ],
      [
        [
          i,
          e['kill_after_s'],
          e['killed'],
          e['results_json_after'],
          '{lmt} / {baseline}'.format(**e['last_logged_step']),
          '{lmt} / {baseline}'.format(**e['checkpoint']),
        ]
        for i, e in enumerate(kr['events'])
      ],
    )  # fmt: skip
  )
  print('checks: ' + ', '.join(f'{k} {v}' for k, v in kr['checks'].items()))
  rows = bad_inputs(
    os.path.join(root, 'reference'), os.path.join(root, 'scratch'), flags, args.only
  )
  print(f'\nBad inputs against a finished run ({root}/reference):\n')
  print(markdown(rows, root))
  ok = kr['checks']['ok'] and all(row_ok(r) for r in rows)
  out = {
    'device': info,
    'ok': ok,
    'seconds': time.time() - t0,
    'kill_restart': kr,
    'bad_inputs': [{**r, 'ok': row_ok(r)} for r in rows],
    'root': root,
  }
  bu.save_results(out, args.out, 'reliability')
  if not args.root:
    shutil.rmtree(root, ignore_errors=True)
  if not ok:
    print('\nreliability check FAILED')
    raise SystemExit(1)
  return out


if __name__ == '__main__':
  main()
