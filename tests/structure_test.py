"""The package's shape: papers never import each other, the shared core imports no paper, the
library imports no launcher or benchmark, and importing the package loads no heavy optional
dependency. Read from the source (every import statement, also those inside functions)."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
PACKAGE = os.path.join(ROOT, 'tsuzuku_jax')
PAPERS = ('lmt', 'vgc', 'fourier', 'flatness')


def _modules():
  """{dotted module name: path} of every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[: -len('.py')]
        name = rel.replace(os.sep, '.').removesuffix('.__init__')
        out[name] = os.path.join(dirpath, f)
  return out


def _imports(path: str, name: str, known: set[str]) -> set[str]:
  """The package modules (and top-level names) `path` imports, resolved to dotted names."""
  tree = ast.parse(open(path).read(), path)
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        parts = package.split('.')
        base = '.'.join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        sub = f'{base}.{a.name}'
        found.add(sub if sub in known else base)
  return {m for m in found if m == 'tsuzuku_jax' or m.startswith(('tsuzuku_jax.', 'experiments',
                                                                    'benchmarks'))}  # fmt: skip


def _group(module: str) -> str:
  parts = module.split('.')
  if parts[0] in ('experiments', 'benchmarks'):
    return parts[0]
  if len(parts) > 1 and parts[1] in PAPERS:
    return parts[1]
  return 'core'


def test_no_paper_imports_another_and_the_core_imports_no_paper():
  modules = _modules()
  assert {f'tsuzuku_jax.{p}' for p in PAPERS} <= set(modules), sorted(modules)
  bad = []
  for name, path in sorted(modules.items()):
    if name == 'tsuzuku_jax':
      continue  # the package root only names its submodules (lazily)
    src = _group(name)
    for dep in sorted(_imports(path, name, set(modules))):
      dst = _group(dep)
      if dst in ('experiments', 'benchmarks'):
        bad.append(f'{name} -> {dep} (the library imports no launcher or benchmark)')
      elif src == 'core' and dst != 'core':
        bad.append(f'{name} -> {dep} (the shared core imports no paper)')
      elif src in PAPERS and dst in PAPERS and dst != src:
        bad.append(f'{name} -> {dep} (papers do not import each other)')
  assert not bad, '\n'.join(bad)


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
  # The rule must not be dodged by a lazy import: a forbidden one inside a function is found.
  path = os.path.join(PACKAGE, 'lmt', 'radii.py')
  modules = set(_modules())
  assert 'tsuzuku_jax.attacks' in _imports(path, 'tsuzuku_jax.lmt.radii', modules)
  src = 'def f():\n  from tsuzuku_jax.vgc import compression\n'
  (tmp_path / 'probe.py').write_text(src)
  got = _imports(str(tmp_path / 'probe.py'), 'tsuzuku_jax.lmt.probe', modules)
  assert 'tsuzuku_jax.vgc.compression' in got
  assert _group('tsuzuku_jax.vgc.compression') == 'vgc' and _group('tsuzuku_jax.data') == 'core'


def test_importing_the_package_loads_no_heavy_optional_dependency():
  code = (
    'import sys, tsuzuku_jax\n'
    'from tsuzuku_jax import lmt\n'
    "print(sorted(m for m in ('matplotlib', 'orbax', 'sklearn', 'tensorflow_datasets') "
    'if m in sys.modules))'
  )
  env = {**os.environ, 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]', out.stdout


def test_every_subpackage_is_in_the_distribution():
  # A wheel (e.g. for Colab) must carry tsuzuku_jax/lmt/ and the other subpackages.
  tomllib = pytest.importorskip('tomllib')
  setuptools = pytest.importorskip('setuptools')
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    find = tomllib.load(f)['tool']['setuptools']['packages']['find']
  shipped = set(setuptools.find_packages(ROOT, include=find['include']))
  packages = {n for n, p in _modules().items() if p.endswith('__init__.py')}
  assert {f'tsuzuku_jax.{p}' for p in PAPERS} <= packages
  assert packages <= shipped, sorted(packages - shipped)


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LAUNCHER_LINES = 400, 80, 120


def test_modules_functions_and_launchers_stay_readable():
  # An afternoon's read: no library module over 400 lines, no function over 80 (docstring
  # included), no launcher over 120 (flags -> Config -> run).
  bad = []
  for name, path in sorted(_modules().items()):
    with open(path) as f:
      src = f.read()
    if src.count('\n') > MAX_MODULE_LINES:
      bad.append(f'{name}: {src.count(chr(10))} lines > {MAX_MODULE_LINES}')
    for node in ast.walk(ast.parse(src, path)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          bad.append(f'{name}.{node.name} (line {node.lineno}): {n} lines > {MAX_FUNCTION_LINES}')
  launchers = os.path.join(ROOT, 'experiments')
  for f in sorted(os.listdir(launchers)):
    if f.endswith('.py') and f != 'common.py':
      with open(os.path.join(launchers, f)) as fh:
        n = fh.read().count('\n')
      if n > MAX_LAUNCHER_LINES:
        bad.append(f'experiments/{f}: {n} lines > {MAX_LAUNCHER_LINES}')
  assert not bad, '\n'.join(bad)
