"""Checks that every notebook in colabs/ is stored executed and executes it at smoke settings.

The kernel is started with TSUZUKU_NOTEBOOK_SMOKE=1 in its environment, which each notebook's
settings cell reads to switch to tiny step counts; it also inherits conftest.py's XLA_FLAGS and
JAX_PLATFORMS. Needs the `python3` Jupyter kernel of the venv (`make install` registers it).
"""

import ast
import glob
import json
import os
import time

import nbformat
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colabs', '*.ipynb')))
# Module base classes a notebook may subclass: the "certify your own model" demos.
ALLOWED_BASES = ('nn.Module', 'flax.linen.Module', 'linen.Module')


def _ids(paths):
  return [os.path.basename(p) for p in paths]


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


def _python_source(cell) -> str:
  """Cell source with IPython magics and shell escapes (`%...`, `!...`) commented out."""
  lines = []
  for line in cell.source.splitlines():
    stripped = line.lstrip()
    lines.append('# ' + line if stripped.startswith(('%', '!')) else line)
  return '\n'.join(lines)


def test_colabs_exist():
  assert NOTEBOOKS, f'no notebooks found in {os.path.join(ROOT, "colabs")}'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_executed_once_top_to_bottom(path):
  """The stored outputs come from one clean run: counts 1..n in cell order, no errors, plots."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  counts = [c.execution_count for c in cells]
  assert counts == list(range(1, len(cells) + 1)), (
    f'{path}: execution counts {counts}; store the outputs of one run from the top '
    '(nbclient, or Restart & Run all)'
  )
  outputs = [o for c in cells for o in c.outputs]
  errors = [o for o in outputs if o.get('output_type') == 'error']
  assert not errors, f'{path} stores error outputs: {[e.get("ename") for e in errors]}'
  assert any('image/png' in o.get('data', {}) for o in outputs), f'{path} stores no figure'
  text = json.dumps([o for o in outputs if o.get('output_type') == 'stream'])
  text += json.dumps([o.get('data', {}).get('text/plain', '') for o in outputs])
  for temp in ('/tmp/', '/var/folders/', 'tsuzuku_lmt_', 'tsuzuku_fourier_', 'tsuzuku_flatness_'):
    assert temp not in text, f'{path} stores a temporary path ({temp!r}) in its outputs'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_uses_the_library_and_defines_no_library_code(path):
  nb = nbformat.read(path, as_version=4)
  trees = [ast.parse(_python_source(c)) for c in _code_cells(nb)]
  imported = set()
  for tree in trees:
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module.split('.')[0])
      elif isinstance(node, ast.Import):
        imported.update(a.name.split('.')[0] for a in node.names)
  assert 'tsuzuku_jax' in imported, f'{path} does not import tsuzuku_jax'
  for tree in trees:
    for node in tree.body:
      assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef), (
        f'{path} defines function {node.name!r}: library code belongs in tsuzuku_jax'
      )
      if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases]
        assert any(b in ALLOWED_BASES for b in bases), (
          f'{path} defines class {node.name!r} (bases {bases}); only user-model demos '
          f'(subclasses of {ALLOWED_BASES}) belong in a notebook'
        )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, monkeypatch):
  from nbclient import NotebookClient

  monkeypatch.setenv('TSUZUKU_NOTEBOOK_SMOKE', '1')  # the kernel inherits os.environ
  nb = nbformat.read(path, as_version=4)  # an in-memory copy: the stored file is never written
  client = NotebookClient(
    nb,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': ROOT}},
    shutdown_kernel='immediate',  # nothing to wait for: a graceful shutdown idles ~2 s
  )
  t0 = time.time()
  client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
  seconds = time.time() - t0
  errors = [
    o for c in _code_cells(nb) for o in c.get('outputs', []) if o.get('output_type') == 'error'
  ]
  assert not errors, errors
  print(f'{os.path.basename(path)} executed in {seconds:.0f}s')
