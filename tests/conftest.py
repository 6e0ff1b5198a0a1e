"""Test set-up, before jax is imported anywhere: 8 fake CPU devices, and a compiler set for
tests.

The suite's time is mostly XLA:CPU compiling many small programs, each run once on tiny data.
So the tests (and the launchers, notebooks and doc blocks they start, which inherit the
environment) compile without LLVM optimisation and without the fusion emitters (about twice
as fast to compile; same semantics, float results within the tests' tolerances), and share a
persistent compilation cache in .cache/jax-tests (a program compiled by one test, worker or
subprocess is read back by the next; entries are keyed by the program, flags and jax version).
Set JAX_COMPILATION_CACHE_DIR to move it, or XLA_FLAGS to add flags. Benchmarks and runs use
the default compiler.
"""

import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = ' '.join(
  (os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8', _FAST_COMPILE)
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.cache', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker more than cores. Many tests wait on a subprocess, a notebook kernel or
  the compilation cache; on the 2-core development machine the cold suite took 308 s with 2
  workers, 295 s with 3 and 327 s with 4."""
  return (os.cpu_count() or 1) + 1


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def shared_data():
  """Path of ../shared/data, or skip with a reason when it is absent."""
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip(f'{path} is absent (it holds the offline MNIST/CIFAR-10 copies)')
  return path
