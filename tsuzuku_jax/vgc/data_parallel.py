"""Data-parallel training with a compressed gradient exchange (one worker per device, or simulated).

Each worker computes the gradient (and, for variance-based methods, the variance estimate) of
its shard of the global batch and runs one optax chain (`make_optimizer`): `vgc.compress`,
the compressed mean `vgc.mean_over('data')`, then SGD, which applies the same update
everywhere. Workers run as `jax.shard_map` over mesh axis `'data'` (one per device: the
code that runs on 8 fake CPU devices runs on a pod), or, with `simulate=True`, as a named
`jax.vmap` on one device (N workers on one accelerator; identical results, see the tests).

Placement of weight decay and momentum (they change what VGC sees):
- `weight_decay_on='update'` adds wd * theta after the exchange (every worker knows theta, so it
  need not be sent); `'gradient'` adds it to each worker's gradient before compression, where it
  is a zero-variance term the variance test passes quickly.
- `momentum_on='update'`: heavy-ball momentum on the averaged update (the optimiser's);
  `'worker'`: each worker applies momentum to its own gradient before compression (the
  placement of DGC's momentum correction, without its momentum-factor masking), and the
  averaged update is applied without momentum. The variance input stays that of the raw
  gradient, so the accumulated momentum (about 1 / (1 - momentum) times larger) passes the VGC
  test far more easily: that is the effect this option exists to show.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tsuzuku_jax import checks, data, distributed, loop
from tsuzuku_jax.vgc import allreduce, compression, transforms, variance

AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """Compressed data-parallel SGD settings (the launcher builds it from flags)."""

  method: str = 'vgc'  # compression.METHODS
  alpha: float = 2.0
  zeta: float = 0.999
  tau: float = 0.01
  density: float = 0.001
  capacity: float = 0.05
  quantize: bool | None = None  # None: the method's default.
  estimator: str = 'cheap'  # variance.ESTIMATORS
  microbatches: int = 4
  workers: int = 8
  simulate: bool = False
  steps: int = 2000
  batch_size: int = 128  # global; each worker gets batch_size / workers.
  learning_rate: float = 0.05
  schedule: str = 'cosine'  # 'cosine' | 'constant'
  momentum: float = 0.9
  momentum_on: str = 'update'  # 'update' | 'worker'
  weight_decay: float = 0.0
  weight_decay_on: str = 'update'  # 'update' | 'gradient'
  seed: int = 0
  eval_every: int = 100
  checkpoint_every: int = 500  # with a workdir: orbax checkpoints (resume inside a run)

  def __post_init__(self):
    checks = [
      (self.workers >= 1, f'workers must be >= 1, got {self.workers}'),
      (self.steps > 0, f'steps must be positive, got {self.steps}'),
      (
        self.batch_size > 0 and self.batch_size % self.workers == 0,
        f'batch_size {self.batch_size} must be a positive multiple of workers={self.workers}',
      ),
      (self.learning_rate > 0, f'learning_rate must be positive, got {self.learning_rate}'),
      (0 <= self.momentum < 1, f'momentum must be in [0, 1), got {self.momentum}'),
      (self.momentum_on in ('update', 'worker'), f'momentum_on: {self.momentum_on!r}'),
      (self.weight_decay >= 0, f'weight_decay must be >= 0, got {self.weight_decay}'),
      (
        self.weight_decay_on in ('update', 'gradient'),
        f'weight_decay_on: {self.weight_decay_on!r}',
      ),
      (self.schedule in ('cosine', 'constant'), f'unknown schedule {self.schedule!r}'),
      (self.estimator in variance.ESTIMATORS, f'estimator must be one of {variance.ESTIMATORS}'),
      (self.eval_every > 0, f'eval_every must be positive, got {self.eval_every}'),
      (
        self.checkpoint_every > 0,
        f'checkpoint_every must be positive, got {self.checkpoint_every}',
      ),
      (
        self.estimator != 'microbatch'
        or (self.microbatches >= 2 and (self.batch_size // self.workers) % self.microbatches == 0),
        f'microbatches={self.microbatches} must be >= 2 and divide the per-worker batch '
        f'{self.batch_size // self.workers}',
      ),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    self.compressor()  # validates alpha, zeta, tau, density, capacity, method

  def compressor(self) -> compression.Compressor:
    return compression.make(
      self.method,
      alpha=self.alpha,
      zeta=self.zeta,
      tau=self.tau,
      density=self.density,
      capacity=self.capacity,
      quantize=self.quantize,
    )


class DPState(NamedTuple):
  step: jax.Array  # shape=(), int32
  params: Any  # replicated
  workers: Any  # the optimiser chain's state, one per worker (leading workers axis)


def make_optimizer(config: DPConfig) -> optax.GradientTransformationExtraArgs:
  """Each worker's optax chain: [weight decay on the gradient] [worker momentum] compress ->
  the compressed mean over 'data' -> [weight decay on the update] SGD (momentum on the
  update). Its `update` takes the variance as the keyword extra argument `variance`."""
  lr = config.learning_rate
  if config.schedule == 'cosine':
    sched = optax.cosine_decay_schedule(lr, config.steps)
  else:
    sched = optax.constant_schedule(lr)
  parts = []
  if config.weight_decay and config.weight_decay_on == 'gradient':
    parts.append(optax.add_decayed_weights(config.weight_decay))
  if config.momentum_on == 'worker' and config.momentum:
    parts.append(optax.trace(decay=config.momentum))  # m = momentum * m + g; send m
  kw = dict(alpha=config.alpha, zeta=config.zeta, tau=config.tau, density=config.density,
            capacity=config.capacity, quantize=config.quantize)  # fmt: skip
  parts += [transforms.compress(config.method, **kw), transforms.mean_over(AXIS)]
  if config.weight_decay and config.weight_decay_on == 'update':
    parts.append(optax.add_decayed_weights(config.weight_decay))
  momentum = config.momentum if config.momentum_on == 'update' and config.momentum else None
  parts.append(optax.sgd(sched, momentum=momentum))
  return optax.chain(*parts)


def init_state(config: DPConfig, params) -> tuple[DPState, optax.GradientTransformationExtraArgs]:
  tx = make_optimizer(config)
  workers = transforms.per_worker(tx.init(params), config.workers)
  return DPState(jnp.zeros((), jnp.int32), params, workers), tx


def make_worker_fn(loss_fn: Callable, config: DPConfig, tx) -> Callable:
  """`f(params, worker_state, local_batch) -> (params, worker_state, metrics)` for one worker.

  Must run with axis `'data'` bound (shard_map or named vmap). `loss_fn(params, batch) ->
  (loss, accuracy)` is a mean over the local batch.
  """
  needs_variance = config.compressor().needs_variance
  estimate = variance.estimator(config.estimator, config.microbatches)

  def worker(params, opt_state, batch):
    if needs_variance:
      (loss, acc), grads, s = estimate(loss_fn, params, batch)
    else:
      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
      s = None
    updates, opt_state = tx.update(grads, opt_state, params, variance=s)
    stats = transforms.compression_stats(opt_state)
    metrics = {
      'loss': jax.lax.pmean(loss, AXIS),
      'accuracy': jax.lax.pmean(acc, AXIS),
      **{k: jax.lax.pmean(jnp.asarray(v, jnp.float32), AXIS) for k, v in stats.items()},
      'max_static_bytes': jax.lax.pmax(jnp.asarray(stats['static_bytes'], jnp.float32), AXIS),
    }
    return optax.apply_updates(params, updates), opt_state, metrics

  return worker


def make_train_step(loss_fn: Callable, config: DPConfig, tx, mesh=None) -> Callable:
  """Jitted `train_step(state, batch) -> (state, metrics)` over the global batch.

  With `config.simulate`, workers are a named vmap on the default device; otherwise a
  `shard_map` over `mesh` (default: all devices) axis `'data'`, whose size must equal
  `config.workers`. Every worker ends the step with the same parameters (the mean is decoded
  identically everywhere); worker 0's are kept.

  Raises:
    ValueError: the mesh has no 'data' axis or its size differs from `config.workers`.
  """
  worker = make_worker_fn(loss_fn, config, tx)
  n = config.workers
  if config.simulate:

    def run(params, ws, batch):
      local = jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), batch)
      new, ws, metrics = jax.vmap(worker, in_axes=(None, 0, 0), axis_name=AXIS)(params, ws, local)
      return jax.tree.map(lambda a: a[0], new), ws, jax.tree.map(lambda a: a[0], metrics)

  else:
    if mesh is None:
      mesh = data.data_mesh()
    allreduce.check_axis(mesh, AXIS)
    if mesh.shape[AXIS] != n:
      raise ValueError(
        f'workers={n} but mesh axis {AXIS!r} has {mesh.shape[AXIS]} devices; set workers to '
        'the device count, or simulate=True to run the workers on one device'
      )

    def local_worker(params, ws, batch):
      new, ws, metrics = worker(params, jax.tree.map(lambda a: a[0], ws), batch)
      return new, jax.tree.map(lambda a: a[None], ws), metrics

    spec = transforms.worker_spec(AXIS)
    run = jax.shard_map(
      local_worker,
      mesh=mesh,
      in_specs=(P(), spec, P(AXIS)),
      out_specs=(P(), spec, P()),
      check_vma=False,  # the decoded mean is identical on every worker by construction
    )

  @jax.jit
  def train_step(state: DPState, batch: dict) -> tuple[DPState, dict]:
    params, ws, metrics = run(state.params, state.workers, batch)
    return DPState(state.step + 1, params, ws), metrics

  return train_step


def place(state: DPState, config: DPConfig, mesh=None) -> DPState:
  """Puts the state on devices: replicated params, worker state split over the mesh."""
  if config.simulate:
    return jax.device_put(state)
  if mesh is None:
    mesh = data.data_mesh()
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  return DPState(
    jax.device_put(state.step, rep),
    jax.device_put(state.params, rep),
    jax.device_put(state.workers, split),
  )


def accuracy(apply_fn: Callable, params, images: np.ndarray, labels: np.ndarray, batch=1000):
  """Test accuracy of `apply_fn(params, images) -> logits` over host arrays. In a multi-process
  job each process evaluates its share of the batches and the counts are summed."""
  fn = jax.jit(apply_fn)
  if loop.is_shared(params):  # on every process's devices: evaluated on this process's own
    params = jax.device_get(params)
  correct = 0
  for i in distributed.mine(-(-len(images) // batch)):
    logits = fn(params, images[i * batch : (i + 1) * batch])
    correct += int(jnp.sum(jnp.argmax(logits, -1) == labels[i * batch : (i + 1) * batch]))
  return int(distributed.total(correct)) / len(images)


BYTES = ('dense_bytes', 'static_bytes', 'ideal_bytes', 'elements', 'sent', 'overflow')


def train(
  loss_fn: Callable,
  apply_fn: Callable,
  params,
  config: DPConfig,
  train_data: tuple[np.ndarray, np.ndarray],
  test_data: tuple[np.ndarray, np.ndarray],
  *,
  workdir: str | None = None,
  mesh=None,
  log: Callable[[str], None] = print,
) -> tuple[Any, dict]:
  """Runs (or resumes) `config.steps` compressed data-parallel steps from `params` on the
  shared loop (`loop.run`): with a `workdir`, orbax checkpoints every `checkpoint_every` steps,
  metrics.jsonl and TensorBoard scalars; a restarted run resumes from its last checkpoint and
  returns the history an uninterrupted run would.

  Args:
    loss_fn: `(params, {'image', 'label'}) -> (mean loss, accuracy)` over a local batch.
    apply_fn: `(params, images) -> logits`, for the test accuracy.
    params: initial parameters.
    config: the run's settings.
    train_data, test_data: `(images, labels)` host arrays.
    workdir: where the run's checkpoints and metrics go (None: nothing is written).
    mesh: mesh with axis 'data' (ignored when simulating; default: all devices).
    log: progress sink.

  Returns:
    `(params, history)` (`history`): per-step 'density' (sent / elements) and 'overflow',
    per-evaluation 'eval_step', 'test_accuracy', 'train_loss', cumulative 'ratio_static',
    'ratio_ideal' (bytes) and 'ratio_elements', and the totals.

  Raises:
    InvalidInput: non-finite parameters or images, or labels outside [0, K) for the K logits
      of `apply_fn` (checked once, before the first step).
    TrainingDiverged: the training loss became NaN/Inf.
  """
  checks.check_params(params)
  for split, (x, y) in (('train', train_data), ('test', test_data)):
    checks.check_images(x, f'{split} images', pixel_range=None)
    checks.check_labels_for(lambda z: apply_fn(params, z), x, y, f'{split} labels')
  images, labels = train_data
  state, tx = init_state(config, params)
  state = place(state, config, mesh)
  step_fn = make_train_step(loss_fn, config, tx, mesh)

  def batches(epoch):
    for b in data.epoch_batches(images, labels, config.batch_size, seed=config.seed, epoch=epoch):
      yield b if config.simulate else data.shard_batch(b, mesh or data.data_mesh())

  def on_log(step, state, window):
    sums = {k: float(sum(float(m[k]) for m in window)) for k in BYTES}
    return {
      'test_accuracy': accuracy(apply_fn, state.params, *test_data),
      'ratio': sums['dense_bytes'] / max(sums['ideal_bytes'], 1.0),  # this window's
      'density_steps': [float(m['sent']) / float(m['elements']) for m in window],
      'overflow_steps': [float(m['overflow']) for m in window],
      'sums': sums,  # over the window's steps
    }

  per_epoch = data.steps_per_epoch(len(images), config.batch_size)
  schedule = loop.Schedule(config.steps, per_epoch, config.eval_every, config.checkpoint_every)
  shown = ('loss', 'test_accuracy', 'ratio')
  state, records = loop.run(state, step_fn, batches, schedule, workdir, label=config.method,
                            shown=shown, on_log=on_log, log=log)  # fmt: skip
  return state.params, history(records)


def history(records: list[dict]) -> dict:
  """`train`'s history from its loop records (one per evaluation): per-step density and
  overflow, per-evaluation accuracy and loss, cumulative ratios and the totals."""
  hist = {k: [] for k in ('density', 'overflow', 'eval_step', 'test_accuracy', 'train_loss')}
  hist.update(ratio_static=[], ratio_ideal=[], ratio_elements=[])
  totals = dict.fromkeys(BYTES, 0.0)
  for r in records:
    for k in BYTES:
      totals[k] += r['sums'][k]
    hist['density'] += r['density_steps']
    hist['overflow'] += r['overflow_steps']
    hist['eval_step'].append(r['step'])
    hist['test_accuracy'].append(r['test_accuracy'])
    hist['train_loss'].append(r['loss'])
    hist['ratio_static'].append(totals['dense_bytes'] / totals['static_bytes'])
    hist['ratio_ideal'].append(totals['dense_bytes'] / totals['ideal_bytes'])
    hist['ratio_elements'].append(totals['elements'] / max(totals['sent'], 1.0))
  hist['totals'] = totals
  return hist
