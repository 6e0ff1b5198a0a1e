"""Multi-process jobs on local processes: 2 processes x 4 CPU devices (gloo collectives) form
one 8-device job; a global batch put by `data.shard_batch` is the same array as on one process,
and processes started with other settings are refused on every process."""

import json

import pytest
from multiprocess import run_processes

from tsuzuku_jax import distributed
from tsuzuku_jax.checks import InvalidInput

JOB = """
import json, os
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from tsuzuku_jax import data, distributed
from tsuzuku_jax.checks import InvalidInput

pid = int(os.environ['PROCESS_ID'])
multi = distributed.initialize(
  f"127.0.0.1:{os.environ['PORT']}", int(os.environ['NUM_PROCESSES']), pid, heartbeat_timeout_s=20
)
batch = {'image': np.arange(64 * 3, dtype=np.float32).reshape(64, 3),
         'label': np.arange(64, dtype=np.int32) % 10}
sharded = data.shard_batch(batch, data.data_mesh())
weights = jnp.arange(1.0, 4.0)
total = float(jax.jit(lambda b: jnp.sum(b['image'] * weights) + jnp.sum(b['label']))(sharded))
whole = np.asarray(multihost_utils.process_allgather(sharded['image'], tiled=True))
distributed.check_same({'steps': 30, 'lr': 0.1})
try:
  distributed.check_same({'steps': 30 + pid})
  refused = None
except InvalidInput as e:
  refused = str(e)
print(json.dumps({'multi': multi, 'devices': jax.device_count(), 'local': jax.local_device_count(),
                  'total': total, 'same': bool(np.array_equal(whole, batch['image'])),
                  'local_shards': len(sharded['image'].addressable_shards), 'refused': refused}))
"""


def test_two_processes_share_one_global_batch_and_refuse_other_settings(tmp_path):
  procs = run_processes(JOB, tmp_path, n=2, devices=4)
  rows = []
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
  image = [[3 * r + c for c in range(3)] for r in range(64)]
  want = sum(v * (c + 1) for row in image for c, v in enumerate(row)) + sum(
    r % 10 for r in range(64)
  )
  for row in rows:
    assert row['multi'] and row['devices'] == 8 and row['local'] == 4 and row['local_shards'] == 4
    assert row['same'] and row['total'] == pytest.approx(want)
    assert row['refused'] == (
      'processes [1] were started with other settings than process 0: run the same command on '
      'every host'
    )


def test_initialize_needs_all_three_or_nothing():
  assert distributed.initialize() is False  # a single-process run: nothing to join
  with pytest.raises(InvalidInput, match='num_processes, process_id missing'):
    distributed.initialize('127.0.0.1:1234')
  with pytest.raises(InvalidInput, match=r'process_id must be in \[0, 2\), got 2'):
    distributed.initialize('127.0.0.1:1234', 2, 2)
  assert distributed.digest({'a': 1, 'b': 2}) == distributed.digest({'b': 2, 'a': 1})
