"""Datasets as float32 NHWC arrays in [0, 1] with int32 labels; batching; data-parallel sharding.

Dataset names accepted by `load` and `validate_name`:

- `'digits'`: scikit-learn's 8x8 digits (1,797 real images shipped inside scikit-learn), with a
  fixed stratified 1,347 / 450 train/test split. Needs no network and no TensorFlow.
- `'mnist'`, `'fashion_mnist'`, `'cifar10'`, ... (`TFDS_NAMES`): through tensorflow_datasets
  (`tfds.data_source`), imported lazily, for machines with internet or a prepared `data_dir`.
- `'npz:PATH'`: one `.npz` file, or a folder of `.npz` parts concatenated in sorted-name order,
  holding `x_train, y_train, x_test, y_test` (images NHWC or NHW, uint8 in [0, 255] or float
  in [0, 1]; integer labels 0..K-1, every class occurring in `y_train`).

Every loaded split is checked (finite pixels in [0, 1], labels in [0, K)); errors are
`checks.InvalidInput` (a ValueError) naming the file, the key and the first bad entry.
"""

import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tsuzuku_jax.checks import (
  InvalidInput,
  MissingDependency,
  MissingInput,
  check_images,
  check_labels,
)

SPLITS = ('train', 'test')
TFDS_NAMES = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'kmnist', 'svhn_cropped')
NAMES = ('digits', *TFDS_NAMES, 'npz:PATH')


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise InvalidInput(f'split must be one of {SPLITS}, got {split!r}')


def validate_name(name: str) -> None:
  """Cheap check of a dataset name, for launchers to call before any work. Loads nothing.

  Args:
    name: a dataset name as accepted by `load`.

  Raises:
    ValueError: the name is unknown (the message lists the accepted names) or `npz:` is empty.
    FileNotFoundError: `npz:PATH` names a path that does not exist.
  """
  if name.startswith('npz:'):
    path = name[len('npz:') :]
    if not path:
      raise InvalidInput(f'dataset {name!r}: npz: needs a path, e.g. npz:/data/mnist.npz')
    if not os.path.exists(path):
      raise MissingInput(f'dataset {name!r}: path {path!r} does not exist')
  elif name != 'digits' and name not in TFDS_NAMES:
    raise InvalidInput(f'unknown dataset {name!r}; accepted names: {", ".join(NAMES)}')


def _to_arrays(
  images, labels, where: str, keys: tuple[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [0, 255] or float [0, 1] images (N,H,W[,C]) and integer labels (N,) -> float32
  (N,H,W,C) in [0,1], int32 (N,). Errors name `where` (the source) and the key at fault."""
  images, labels = np.asarray(images), np.asarray(labels)
  at = [f'{where} key {k!r}' for k in keys] if keys else [where, where]
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise InvalidInput(f'{at[0]}: images must be (N,H,W) or (N,H,W,C), got shape {images.shape}')
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise InvalidInput(
      f'{at[1]}: labels must be integers of shape (N,), got {labels.dtype} {labels.shape}'
    )
  if len(labels) != len(images):
    raise InvalidInput(f'{where}: {len(images)} images but {len(labels)} labels')
  if images.dtype == np.uint8:
    x = images.astype(np.float32)
    x /= 255.0
  elif np.issubdtype(images.dtype, np.floating):
    x = images.astype(np.float32)
    hint = ' (float images are taken as they are: pixels in [0, 1])'
    check_images(x, f'{at[0]}: images', hint=hint)
  else:
    raise InvalidInput(
      f'{at[0]}: images have dtype {images.dtype}; expected uint8 in [0, 255] or float in [0, 1]'
    )
  check_labels(labels, None, f'{at[1]}: labels')
  return x, labels.astype(np.int32)


def infer_num_classes(train_labels: np.ndarray, where: str = 'training labels') -> int:
  """K = max + 1 of the training labels, each of the classes 0..K-1 occurring at least once.

  A class that never occurs in training almost always means shifted labels (1..K, or 100..109),
  so it is an error here: relabel, or give `num_classes` to `load` explicitly.

  Raises:
    InvalidInput: empty or negative labels, or a class in 0..K-1 with no example.
  """
  labels = np.asarray(train_labels)
  if not labels.size:
    raise InvalidInput(f'{where}: no labels')
  check_labels(labels, None, f'{where}: labels')
  k = int(labels.max()) + 1
  missing = np.setdiff1d(np.arange(k), labels)
  if missing.size:
    shown = ', '.join(str(int(m)) for m in missing[:5]) + (', ...' if missing.size > 5 else '')
    raise InvalidInput(
      f'{where}: labels run up to {k - 1} but {missing.size} of the classes 0..{k - 1} never '
      f'occur ({shown}); labels must be 0..K-1 (relabel, or pass num_classes)'
    )
  return k


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  # The CSV scikit-learn ships, read as its load_digits does, without importing scikit-learn
  # (a second per process); the split is train_test_split(range(1797), test_size=0.25,
  # random_state=0, stratify=labels), stored in digits_split.npz (tests/data_test.py checks both).
  spec = importlib.util.find_spec('sklearn')
  csv = os.path.join(os.path.dirname(spec.origin), 'datasets', 'data', 'digits.csv.gz')
  table = np.loadtxt(csv, delimiter=',')
  labels = table[:, -1].astype(np.int32)
  idx = np.load(os.path.join(os.path.dirname(__file__), 'digits_split.npz'))[split]
  images = (table[idx, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[..., None]
  return images, labels[idx]


def _npz_parts(path: str) -> list[str]:
  if not os.path.exists(path):
    raise MissingInput(f'npz dataset path {path!r} does not exist')
  if not os.path.isdir(path):
    return [path]
  files = sorted(f for f in os.listdir(path) if f.endswith('.npz'))
  if not files:
    raise MissingInput(f'npz dataset folder {path!r} contains no .npz files')
  return [os.path.join(path, f) for f in files]


def _read_npz(part: str, keys: tuple[str, ...], folder: bool) -> list[np.ndarray] | None:
  """The arrays under `keys` in one file; None for a folder part that has none of them."""
  try:
    with np.load(part) as z:
      has = [k in z.files for k in keys]
      if not any(has) and folder:
        return None
      if not all(has):
        missing = keys[has.index(False)]
        raise InvalidInput(f'npz file {part!r} has no key {missing!r} (keys: {", ".join(z.files)})')
      return [z[k] for k in keys]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, InvalidInput):
      raise
    raise InvalidInput(f'npz file {part!r} cannot be read: {type(e).__name__}: {e}') from None


def _load_npz(path: str, split: str, keys: tuple[str, ...]) -> list[np.ndarray]:
  parts = _npz_parts(path)
  folder = os.path.isdir(path)
  arrays = [a for a in (_read_npz(p, keys, folder) for p in parts) if a is not None]
  if not arrays:
    raise InvalidInput(f'no .npz part in folder {path!r} has keys {", ".join(map(repr, keys))}')
  return [np.concatenate(col) if len(col) > 1 else col[0] for col in zip(*arrays, strict=True)]


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingDependency(
      f'dataset {name!r} needs tensorflow_datasets: `pip install tensorflow-datasets` '
      '(or `pip install tsuzuku_jax[tfds]`), or use npz:PATH with a local copy'
    ) from e
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r['image']) for r in records])
  labels = np.asarray([r['label'] for r in records])
  return _to_arrays(images, labels, f'tfds {name!r} {split}')


def _load_npz_split(path: str, split: str, num_classes: int | None):
  xk, yk = f'x_{split}', f'y_{split}'
  kind = 'folder' if os.path.isdir(path) else 'file'
  x, y = _load_npz(path, split, (xk, yk))
  images, labels = _to_arrays(x, y, f'npz {kind} {path!r}', (xk, yk))
  if num_classes is None:
    train = labels if split == 'train' else _load_npz(path, 'train', ('y_train',))[0]
    train = train.reshape(len(train), -1)[:, 0] if np.ndim(train) == 2 else train
    num_classes = infer_num_classes(train, f"npz {kind} {path!r} key 'y_train'")
  check_labels(labels, num_classes, f'npz {kind} {path!r} key {yk!r}: labels')
  return images, labels


def load(
  name: str, split: str, *, data_dir: str | None = None, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a dataset split as host arrays, checked: finite images in [0, 1], labels in [0, K).

  `'digits'` uses scikit-learn's `load_digits` (pixel values 0..16 divided by 16) and the fixed
  split `train_test_split(np.arange(1797), test_size=0.25, random_state=0, stratify=labels)`:
  1,347 train / 450 test images, in the order that call returns them.

  `'npz:PATH'` accepts uint8 images in [0, 255] (divided by 255) or float images in [0, 1]
  (kept as they are); NHW arrays get a channel axis and (N, 1) labels are flattened. Without
  `num_classes`, K is inferred from `y_train` (`infer_num_classes`: every class 0..K-1 must
  occur there), also when loading the test split.

  Args:
    name: `'digits'`, a name in `TFDS_NAMES`, or `'npz:PATH'` (see the module docstring).
    split: `'train'` or `'test'`.
    data_dir: tensorflow_datasets data directory (tfds names only; None: tfds's default).
    num_classes: K, when known; labels outside [0, K) are an error.

  Returns:
    `(images, labels)`: images float32 (N, H, W, C) in [0, 1]; labels int32 (N,).

  Raises:
    InvalidInput (a ValueError): unknown name or split, or malformed content (a missing key, an
      unreadable file, images of another dtype or outside [0, 1], non-finite pixels, labels
      outside [0, K), a count mismatch); the message names the file, the key and the problem.
    MissingInput (a FileNotFoundError): an npz path that does not exist, or a folder without
      `.npz` files.
    ImportError: a tfds name where tensorflow_datasets is not installed.
  """
  _check_split(split)
  validate_name(name)
  if name == 'digits':
    images, labels = _load_digits(split)
    check_labels(labels, num_classes or 10, 'digits: labels')
    return images, labels
  if name.startswith('npz:'):
    return _load_npz_split(name[len('npz:') :], split, num_classes)
  images, labels = _load_tfds(name, split, data_dir)
  if num_classes is not None:
    check_labels(labels, num_classes, f'tfds {name!r} {split}: labels')
  return images, labels


def num_classes(labels: np.ndarray) -> int:
  """Number of classes of training labels 0..K-1: `infer_num_classes` (every class occurs)."""
  return infer_num_classes(labels)


def fingerprint(*arrays: np.ndarray) -> str:
  """A 128-bit BLAKE2b digest of the arrays' dtypes, shapes and bytes (hex): equal digests mean
  equal arrays, bit for bit. About 1 GB/s on one core."""
  h = hashlib.blake2b(digest_size=16)
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape};'.encode())
    h.update(a.data.cast('B') if a.size else b'')
  return h.hexdigest()


def identity(name: str, **splits: tuple[np.ndarray, np.ndarray]) -> dict:
  """What a run was computed on: the dataset name and, per split, its size, image shape and
  a fingerprint of the images and labels (for `run.json`)."""
  out = {'name': name}
  for split, (images, labels) in splits.items():
    out[split] = {
      'examples': int(len(images)),
      'image_shape': [int(d) for d in np.shape(images)[1:]],
      'fingerprint': fingerprint(images, labels),
    }
  return out


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches `epoch_batches` yields for `n` examples.

  Raises:
    ValueError: `batch_size < 1`, or `batch_size > n` with `drop_remainder` (no full batch).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if drop_remainder:
    if batch_size > n:
      raise ValueError(f'batch_size={batch_size} > n={n} examples with drop_remainder=True')
    return n // batch_size
  return -(-n // batch_size)


def epoch_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches for one training epoch, in an order that depends only on `(seed, epoch)`.

  The order is `jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)`, so
  a run resumed at epoch `e` sees exactly the batches it would have seen. Every host of a
  multi-host job computes the same global batches (see `shard_batch`).

  Args:
    images: (N, ...) array.
    labels: (N, ...) array.
    batch_size: examples per batch.
    seed: data-order seed.
    epoch: epoch index, folded into the seed.
    shuffle: if False, batches are taken in the stored order.
    drop_remainder: drop the final partial batch (otherwise it is yielded, smaller).

  Returns:
    An iterator of `{'image': (B, ...), 'label': (B, ...)}` numpy batches.

  Raises:
    ValueError: mismatched lengths, or a bad `batch_size` (see `steps_per_epoch`); raised at the
      call, not at the first `next`.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f'{n} images but {len(labels)} labels')
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if shuffle:
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    order = np.asarray(jax.random.permutation(key, n))
  else:
    order = np.arange(n)

  def gen() -> Iterator[dict[str, np.ndarray]]:
    for s in range(steps):
      idx = order[s * batch_size : (s + 1) * batch_size]
      yield {'image': images[idx], 'label': labels[idx]}

  return gen()


def eval_batches(
  images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """In-order `{'image': (B, ...), 'label': (B, ...)}` slices of (N, ...) arrays covering every
  example once, B <= batch_size (>= 1): the last batch may be smaller (no padding)."""
  return epoch_batches(
    images, labels, batch_size, seed=0, epoch=0, shuffle=False, drop_remainder=False
  )


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `'data'` over all devices (or the given ones, in the given order).

  The axis type is `Auto` (classic GSPMD propagation) in both cases.
  """
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=auto)
  return Mesh(np.array(devices), ('data',), axis_types=auto)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
  """Puts a host batch on devices, splitting the leading (batch) axis over mesh axis `'data'`.

  In a multi-process job every process passes the same global batch (as `epoch_batches`
  yields) and puts only the rows of its own devices.

  Args:
    batch: dict of arrays with a common leading dimension B.
    mesh: a mesh with a `'data'` axis, or None (single device: plain `jax.device_put`).

  Returns:
    Dict of `jax.Array`s, sharded as `NamedSharding(mesh, P('data'))` when the mesh has more
    than one device.

  Raises:
    ValueError: the mesh has no `'data'` axis, or B is not divisible by its size.
  """
  if mesh is None or mesh.size == 1:
    return {k: jax.device_put(v) for k, v in batch.items()}
  if 'data' not in mesh.axis_names:
    raise ValueError(f"mesh has no 'data' axis (axes: {mesh.axis_names})")
  n_dev = mesh.shape['data']
  sharding = NamedSharding(mesh, P('data'))
  out = {}
  for k, v in batch.items():
    if v.shape[0] % n_dev:
      raise ValueError(
        f'batch size {v.shape[0]} (key {k!r}) is not divisible by the {n_dev} devices '
        "of mesh axis 'data'"
      )
    if jax.process_count() > 1:  # each process fills its own devices' shards
      out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    else:
      out[k] = jax.device_put(v, sharding)
  return out
