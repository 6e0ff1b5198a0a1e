"""The documentation runs as written: every ```python block of README.md and docs/*.md executes
in a fresh subprocess (repository root on PYTHONPATH, a temporary working directory; 8 fake CPU
devices for a block that builds a mesh), and every script, flag file, image, page and heading
that the pages point to exists.

Shell blocks (```bash, ```sh) are not run; the launchers and benchmarks they show have their
own tests. Output and other text goes in plain ``` or ```text blocks.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

import pytest
from launcher import cpu_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
PAGES = ['README.md', *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f'{ROOT}/docs/*.md'))]
LANGUAGES = {'python', 'bash', 'sh', 'text', ''}
TIMEOUT_S = 120
FENCE = re.compile(r'^(\s*)```(\S*)\s*$')


def _blocks(page: str) -> list[tuple[int, str, str]]:
  """(line number, language, code) of every fenced block of a page, indentation removed."""
  lines = open(os.path.join(ROOT, page), encoding='utf-8').read().split('\n')
  blocks, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, language, start = len(m.group(1)), m.group(2), i + 1
    i += 1
    while i < len(lines) and lines[i].strip() != '```':
      i += 1
    if i == len(lines):
      raise AssertionError(f'{page}:{start}: a ``` block is never closed')
    blocks.append((start, language, '\n'.join(line[indent:] for line in lines[start:i])))
    i += 1
  return blocks


ALL_BLOCKS = [(page, *block) for page in PAGES for block in _blocks(page)]
PYTHON_BLOCKS = [(page, line, code) for page, line, lang, code in ALL_BLOCKS if lang == 'python']


def _run(code: str) -> subprocess.CompletedProcess:
  # A block that builds a mesh runs on 8 fake CPU devices, the others on one (as a user's
  # plain `python` would; XLA:CPU compiles slower when split into 8 devices).
  path = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
  devices = 8 if re.search(r'make_mesh|shard_map', code) else 1
  env = cpu_env(devices, PYTHONPATH=path, MPLBACKEND='Agg')
  with tempfile.TemporaryDirectory() as cwd:
    path = os.path.join(cwd, 'block.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(code)
    try:
      return subprocess.run(
        [sys.executable, path], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
      )
    except subprocess.TimeoutExpired as e:
      return subprocess.CompletedProcess(e.cmd, -1, '', f'timed out after {TIMEOUT_S} s')


def test_there_are_python_blocks_and_only_known_languages():
  assert len(PYTHON_BLOCKS) >= 4, 'every paper page has a "use it on your own model" block'
  for page, line, language, _ in ALL_BLOCKS:
    assert language in LANGUAGES, f'{page}:{line}: ```{language} (use one of {sorted(LANGUAGES)})'


@pytest.mark.parametrize(
  'page,line,code', PYTHON_BLOCKS, ids=[f'{p}-{n}' for p, n, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(page, line, code):
  # One subprocess per test (xdist spreads them over the workers).
  result = _run(code)
  assert result.returncode == 0, (
    f'the python block at {page}:{line} failed (exit {result.returncode}):\n'
    + (result.stdout[-2000:] + result.stderr[-4000:])
  )


def test_scripts_and_flag_files_named_in_blocks_exist():
  missing = []
  for page, line, _, code in ALL_BLOCKS:
    names = re.findall(r'(?<![\w./])((?:experiments|benchmarks)/[\w/]+\.py)\b', code)
    names += re.findall(r'--flagfile=(\S+)', code)
    missing += [f'{page}:{line}: {n}' for n in names if not os.path.isfile(os.path.join(ROOT, n))]
  assert not missing, 'named in a block but absent:\n' + '\n'.join(missing)


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def _anchors(page: str) -> set[str]:
  text = open(os.path.join(ROOT, page), encoding='utf-8').read()
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  return {_slug(h) for h in re.findall(r'^#+ (.*)$', text, flags=re.M)}


def test_links_and_images_point_to_files_and_headings_that_exist():
  broken = []
  for page in PAGES:
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+://', target):
        continue
      path, _, anchor = target.partition('#')
      full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else None
      if full and not os.path.exists(full):
        broken.append(f'{page}: {target} (no such file)')
      elif anchor and anchor not in _anchors(os.path.relpath(full, ROOT) if full else page):
        broken.append(f'{page}: {target} (no such heading)')
  assert not broken, 'broken links:\n' + '\n'.join(broken)
