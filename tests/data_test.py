"""Tests for tsuzuku_jax.data: loading, batching order, sharding."""

import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tsuzuku_jax import data


def _uint8(shape, offset=0):
  return ((np.arange(np.prod(shape)) + offset) % 256).astype(np.uint8).reshape(shape)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range_counts():
  xtr, ytr = data.load('digits', 'train')
  xte, yte = data.load('digits', 'test')
  assert xtr.shape == (1347, 8, 8, 1) and xte.shape == (450, 8, 8, 1)
  assert ytr.shape == (1347,) and yte.shape == (450,)
  assert xtr.dtype == np.float32 and ytr.dtype == np.int32 and yte.dtype == np.int32
  assert xtr.min() == 0.0 and xtr.max() == 1.0 and 0.0 <= xte.min() and xte.max() <= 1.0
  assert set(np.unique(ytr)) == set(range(10)) and data.num_classes(ytr) == 10
  # Stratified: each class has 25% of its examples (43-46) in test.
  assert np.bincount(yte, minlength=10).min() >= 43


def test_digits_are_scikit_learns_with_its_stratified_split():
  # data.py reads scikit-learn's CSV and a stored split instead of importing scikit-learn.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  tr, te = train_test_split(np.arange(1797), test_size=0.25, random_state=0, stratify=d.target)
  for split, idx in (('train', tr), ('test', te)):
    x, y = data.load('digits', split)
    np.testing.assert_array_equal(x, (d.images[idx] / 16.0).astype(np.float32)[..., None])
    np.testing.assert_array_equal(y, d.target[idx].astype(np.int32))
    assert x.dtype == np.float32 and y.dtype == np.int32


def test_digits_split_is_stable_and_a_partition():
  from sklearn.datasets import load_digits

  xtr, ytr = data.load('digits', 'train')
  xte, yte = data.load('digits', 'test')
  xtr2, ytr2 = data.load('digits', 'train')
  np.testing.assert_array_equal(ytr[:20], ytr2[:20])
  np.testing.assert_array_equal(xtr, xtr2)
  # Train + test rows are exactly the 1797 original (image, label) rows, each used once.
  d = load_digits()
  full = np.concatenate([d.images.reshape(-1, 64) / 16.0, d.target[:, None]], axis=1)
  ours = np.concatenate(
    [
      np.concatenate([xtr.reshape(-1, 64), ytr[:, None]], axis=1),
      np.concatenate([xte.reshape(-1, 64), yte[:, None]], axis=1),
    ]
  )

  def rows(a):
    return a[np.lexsort(a.T[::-1])]

  np.testing.assert_allclose(rows(ours), rows(full), atol=1e-7)


def test_bad_split_and_name():
  with pytest.raises(ValueError, match="'valid'"):
    data.load('digits', 'valid')
  with pytest.raises(ValueError, match='unknown dataset .imagenet_zzz.*digits.*mnist'):
    data.load('imagenet_zzz', 'train')


# ----------------------------------------------------------------------------- npz


def test_npz_file(tmp_path):
  path = str(tmp_path / 'd.npz')
  x_train, x_test = _uint8((5, 4, 4, 3)), _uint8((3, 4, 4), 7)
  np.savez(
    path,
    x_train=x_train,
    y_train=np.arange(5, dtype=np.int64),
    x_test=x_test,
    y_test=np.array([[2], [1], [0]], np.uint8),
  )
  x, y = data.load('npz:' + path, 'train')
  assert x.shape == (5, 4, 4, 3) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_allclose(x, x_train / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, np.arange(5))
  x, y = data.load('npz:' + path, 'test')  # (N,H,W) gets a channel axis; (N,1) labels flatten
  assert x.shape == (3, 4, 4, 1)
  np.testing.assert_allclose(x[..., 0], x_test / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, [2, 1, 0])


def test_npz_folder_of_parts(tmp_path):
  parts = [_uint8((2, 3, 3, 1), 10 * i) for i in range(3)]
  # Names chosen so that sorted order differs from creation order.
  for i, name in [(2, 'train_2'), (0, 'train_0'), (1, 'train_1')]:
    np.savez(tmp_path / f'{name}.npz', x_train=parts[i], y_train=np.full(2, i))
  np.savez(tmp_path / 'test.npz', x_test=_uint8((4, 3, 3, 1)), y_test=np.array([2, 1, 0, 2]))
  (tmp_path / 'notes.txt').write_text('ignored')
  x, y = data.load(f'npz:{tmp_path}', 'train')
  np.testing.assert_allclose(x, np.concatenate(parts) / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, [0, 0, 1, 1, 2, 2])
  x, y = data.load(f'npz:{tmp_path}', 'test')
  assert x.shape == (4, 3, 3, 1) and list(y) == [2, 1, 0, 2]


def test_npz_errors(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    data.load('npz:' + missing, 'train')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='empty.*no .npz'):
    data.load(f'npz:{empty}', 'train')

  path = str(tmp_path / 'nokey.npz')
  np.savez(path, x_train=_uint8((2, 2, 2, 1)), y_train=np.arange(2), x_test=_uint8((2, 2, 2, 1)))
  with pytest.raises(ValueError, match="nokey.npz.*no key 'y_test'"):
    data.load('npz:' + path, 'test')

  path = str(tmp_path / 'int.npz')
  np.savez(path, x_train=np.zeros((2, 2, 2, 1), np.int64), y_train=np.arange(2))
  with pytest.raises(ValueError, match='int.npz.*int64.*uint8 in .0, 255. or float in .0, 1.'):
    data.load('npz:' + path, 'train')

  path = str(tmp_path / 'count.npz')
  np.savez(path, x_train=_uint8((3, 2, 2, 1)), y_train=np.arange(2))
  with pytest.raises(ValueError, match='count.npz.*3 images but 2 labels'):
    data.load('npz:' + path, 'train')

  parts = tmp_path / 'parts'
  parts.mkdir()
  np.savez(parts / 'a.npz', x_train=_uint8((2, 2, 2, 1)))
  with pytest.raises(ValueError, match="a.npz.*no key 'y_train'"):
    data.load(f'npz:{parts}', 'train')
  with pytest.raises(ValueError, match='parts.*x_test'):
    data.load(f'npz:{parts}', 'test')


def _npz(path, x_train, y_train, x_test=None, y_test=None):
  x_test = x_train if x_test is None else x_test
  y_test = y_train if y_test is None else y_test
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return f'npz:{path}'


def test_npz_labels_are_checked_against_the_classes(tmp_path):
  x = _uint8((10, 2, 2, 1))
  # Observed: labels 100..109 were accepted (and reported as 110 classes).
  name = _npz(tmp_path / 'shifted.npz', x, np.arange(100, 110))
  for split in ('train', 'test'):
    with pytest.raises(ValueError, match=r"shifted.npz' key 'y_train'.*up to 109.*0, 1, 2, 3, 4"):
      data.load(name, split)
  # Observed: negative labels were accepted.
  name = _npz(tmp_path / 'negative.npz', x, np.array([0, 1, -1, 2, 3, 4, 5, 6, 7, 8]))
  with pytest.raises(ValueError, match=r"negative.npz.*'y_train'.*labels\[2\] = -1 is negative"):
    data.load(name, 'train')
  # A test label no training example has.
  name = _npz(tmp_path / 'unseen.npz', x, np.arange(10) % 5, y_test=np.array([0] * 9 + [7]))
  assert data.load(name, 'train')[1].max() == 4
  with pytest.raises(
    ValueError, match=r"unseen.npz.*'y_test'.*labels\[9\] = 7 is outside \[0, 5\)"
  ):
    data.load(name, 'test')
  # Given explicitly, K is used as is (a class may be absent from a small training set).
  assert data.load(name, 'test', num_classes=10)[1][9] == 7
  with pytest.raises(ValueError, match=r'labels\[9\] = 7 is outside \[0, 6\)'):
    data.load(name, 'test', num_classes=6)
  with pytest.raises(ValueError, match=r'digits.*labels\[\d+\] = 9 is outside \[0, 5\)'):
    data.load('digits', 'test', num_classes=5)


def test_npz_float_images_in_unit_range(tmp_path):
  # Observed: float images in [0, 1] were refused (uint8 only), which no document said.
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (6, 3, 3, 2)).astype(np.float64)
  x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
  name = _npz(tmp_path / 'f.npz', x, np.arange(6) % 3)
  got, _ = data.load(name, 'train')
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, x.astype(np.float32))
  bad = x.copy()
  bad[4, 2, 1, 1] = 1.2
  name = _npz(tmp_path / 'over.npz', bad, np.arange(6) % 3)
  with pytest.raises(
    ValueError, match=r"over.npz.*'x_train'.*images\[4, 2, 1, 1\] = 1.2 is outside \[0, 1\]"
  ):
    data.load(name, 'train')
  bad[4, 2, 1, 1] = np.nan
  name = _npz(tmp_path / 'nan.npz', bad, np.arange(6) % 3)
  with pytest.raises(ValueError, match=r'nan.npz.*images\[4, 2, 1, 1\] is nan'):
    data.load(name, 'train')


def test_unreadable_npz_is_named(tmp_path):
  path = tmp_path / 'broken.npz'
  path.write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(ValueError, match="npz file .*broken.npz' cannot be read"):
    data.load(f'npz:{path}', 'train')


def test_real_mnist_test_split(shared_data):
  x, y = data.load('npz:' + os.path.join(shared_data, 'mnist.npz'), 'test')
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert y.dtype == np.int32 and 0.0 <= x.min() and x.max() == 1.0
  np.testing.assert_array_equal(y[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])


# ----------------------------------------------------------------------------- names, tfds


def test_validate_name(tmp_path):
  data.validate_name('digits')
  data.validate_name('mnist')
  data.validate_name(f'npz:{tmp_path}')
  with pytest.raises(ValueError, match='accepted names: digits, mnist'):
    data.validate_name('mnsit')
  with pytest.raises(FileNotFoundError, match='missing_dir'):
    data.validate_name(f'npz:{tmp_path}/missing_dir')
  with pytest.raises(ValueError, match='needs a path'):
    data.validate_name('npz:')


def test_tfds_missing_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import now fails
  with pytest.raises(ImportError, match='pip install tensorflow-datasets.*npz:PATH'):
    data.load('mnist', 'test')


# ----------------------------------------------------------------------------- batching


def _toy(n=10):
  return np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), np.arange(n)


def test_epoch_batches_deterministic_in_seed_and_epoch():
  x, y = _toy(10)

  def labels(**kw):
    return [b['label'].tolist() for b in data.epoch_batches(x, y, 3, **kw)]

  a = labels(seed=1, epoch=4)
  assert len(a) == 3 == data.steps_per_epoch(10, 3) and all(len(b) == 3 for b in a)
  assert a == labels(seed=1, epoch=4)
  assert a != labels(seed=1, epoch=5)
  assert a != labels(seed=2, epoch=4)
  key = jax.random.fold_in(jax.random.key(1), 4)
  expected = np.asarray(jax.random.permutation(key, 10))[:9].reshape(3, 3)
  np.testing.assert_array_equal(a, expected)
  for b in data.epoch_batches(x, y, 3, seed=1, epoch=4):
    np.testing.assert_array_equal(b['image'][:, 0], b['label'])  # pairs stay together


def test_epoch_batches_cover_every_example_once():
  x, y = _toy(10)
  batches = list(data.epoch_batches(x, y, 4, seed=0, epoch=0, drop_remainder=False))
  assert [len(b['label']) for b in batches] == [4, 4, 2] and data.steps_per_epoch(10, 4, False) == 3
  assert sorted(np.concatenate([b['label'] for b in batches]).tolist()) == list(range(10))
  ordered = list(data.epoch_batches(x, y, 4, seed=0, epoch=0, shuffle=False))
  assert [b['label'].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_batch_size_errors():
  x, y = _toy(10)
  with pytest.raises(ValueError, match='batch_size=16 > n=10'):
    data.epoch_batches(x, y, 16, seed=0, epoch=0)  # raised at the call
  with pytest.raises(ValueError, match='batch_size'):
    data.steps_per_epoch(10, 0)
  assert len(list(data.epoch_batches(x, y, 16, seed=0, epoch=0, drop_remainder=False))) == 1


def test_eval_batches_in_order_with_smaller_last():
  x, y = _toy(10)
  batches = list(data.eval_batches(x, y, 4))
  assert [b['label'].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ----------------------------------------------------------------------------- sharding


def test_data_mesh():
  mesh = data.data_mesh()
  assert mesh.axis_names == ('data',) and mesh.shape['data'] == jax.device_count() == 8
  small = data.data_mesh(jax.devices()[:2])
  assert small.shape['data'] == 2 and list(small.devices) == jax.devices()[:2]


def test_shard_batch_splits_batch_axis():
  mesh = data.data_mesh()
  x, y = _toy(16)
  out = data.shard_batch({'image': x, 'label': y}, mesh)
  for k, v in [('image', x), ('label', y)]:
    arr = out[k]
    assert isinstance(arr, jax.Array) and arr.sharding.spec == P('data')
    assert len(arr.addressable_shards) == 8
    assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
    assert len({s.device for s in arr.addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(arr), v)
  # A jitted reduction over the sharded batch matches numpy.
  np.testing.assert_allclose(jax.jit(lambda a: a.sum(0))(out['image']), x.sum(0))


def test_shard_batch_single_device_and_errors():
  x, y = _toy(6)
  out = data.shard_batch({'image': x, 'label': y}, None)
  np.testing.assert_array_equal(np.asarray(out['label']), y)
  out = data.shard_batch({'image': x}, data.data_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(np.asarray(out['image']), x)
  with pytest.raises(ValueError, match='batch size 6.*8 devices'):
    data.shard_batch({'image': x, 'label': y}, data.data_mesh())


def test_real_cifar10_folder_test_split(shared_data):
  x, y = data.load('npz:' + os.path.join(shared_data, 'cifar10'), 'test')
  assert x.shape == (10000, 32, 32, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(y[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
