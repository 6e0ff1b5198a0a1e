"""Training loop: TrainState, jitted train/eval steps, orbax checkpoint/resume, metrics.jsonl.

`train(model, config, images, labels, workdir, loss=...)` trains a plain Flax model
(`__call__(x)` or `__call__(x, *, train)`, returning logits; batch norm statistics in the
`batch_stats` collection) with a `Loss`: cross-entropy by default, or a paper's (LMT's margin
loss is `lmt.training_loss`). Nothing here knows about any paper. A run restarted on the same
workdir resumes from the last checkpoint and ends with the same parameters as an uninterrupted
run: the data order depends only on (seed, epoch) and the dropout key only on (seed, step).
"""

import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tsuzuku_jax import checks, data, distributed, loop
from tsuzuku_jax import workdir as record
from tsuzuku_jax.loop import CheckpointMismatch, TrainingDiverged  # noqa: F401 (re-exported)

OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('cosine', 'constant', 'step')  # cosine and step decay after any warm-up


class TrainState(NamedTuple):
  step: jax.Array  # shape=(), int32: number of optimiser steps taken.
  params: Any
  batch_stats: Any  # running batch-norm statistics ({} for models without BN).
  loss_state: Any  # what the loss carries across steps (LMT's power-iteration vectors; {}).
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings (the launcher builds it from flags); the loss has its own."""

  steps: int = 1000
  batch_size: int = 128
  optimizer: str = 'adam'  # 'adam' | 'sgd' (Nesterov momentum 0.9)
  learning_rate: float = 1e-3
  schedule: str = 'cosine'  # 'cosine' | 'constant' | 'step' (x0.1 at 50% and 75%)
  warmup_steps: int = 0
  weight_decay: float = 0.0
  seed: int = 0
  log_every: int = 100
  checkpoint_every: int = 1000
  max_checkpoints: int = 2

  def __post_init__(self):
    checks = [
      (self.steps > 0, f'steps must be positive, got {self.steps}'),
      (self.batch_size > 0, f'batch_size must be positive, got {self.batch_size}'),
      (self.learning_rate > 0, f'learning_rate must be positive, got {self.learning_rate}'),
      (self.optimizer in OPTIMIZERS, f'unknown optimizer {self.optimizer!r}'),
      (self.schedule in SCHEDULES, f'unknown schedule {self.schedule!r}'),
      (self.checkpoint_every > 0, 'checkpoint_every must be positive'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)


class Loss(NamedTuple):
  """A training loss on the trainer's forward pass, with state it may carry across steps.

  `fn(variables, loss_state, logits, labels, step) -> (loss, (loss_state, metrics))`:
  `variables` are the model's at this step (parameters being differentiated, this step's
  batch statistics), `logits` the training forward pass's; `metrics` a dict of scalars logged
  beside loss and accuracy. `init(variables, key) -> loss_state` (a pytree, {} for none).
  `config` is what identifies the loss in a run record (`run.json`).
  """

  fn: Callable
  init: Callable = lambda variables, key: {}
  config: dict = {}
  shown: tuple[str, ...] = ()  # metrics of `fn` printed in the progress line (all are logged)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the one every experiment uses)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _plain(variables, loss_state, logits, labels, step):
  return cross_entropy(logits, labels), (loss_state, {})


CROSS_ENTROPY = Loss(_plain, config={'loss': 'cross_entropy'})


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  lr = config.learning_rate
  if config.schedule == 'cosine':
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, config.steps)
  elif config.schedule == 'step':
    bounds = {int(config.steps * 0.5): 0.1, int(config.steps * 0.75): 0.1}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  else:
    sched = optax.constant_schedule(lr)
  if config.optimizer == 'adam':
    return optax.adamw(sched, weight_decay=config.weight_decay)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(sched, momentum=0.9, nesterov=True),
  )


def _takes_train(model) -> bool:
  return 'train' in inspect.signature(type(model).__call__).parameters


def apply_fn(model) -> Callable:
  """`(variables, images) -> logits` of a Flax model in evaluation mode (`train=False` when its
  `__call__` takes `train`): the function that is certified and attacked."""
  if _takes_train(model):
    return functools.partial(_eval_apply, model)
  return model.apply


def _eval_apply(model, variables, x):
  return model.apply(variables, x, train=False)


def create_state(
  model, config: TrainConfig, input_shape, loss: Loss = CROSS_ENTROPY
) -> tuple[TrainState, Any]:
  """Initialises parameters, BN statistics, the loss' state and the optimiser state."""
  x = jnp.zeros((1, *input_shape), jnp.float32)
  init = functools.partial(model.init, train=False) if _takes_train(model) else model.init
  # Jitted: an eager init compiles every small op separately (seconds for a tiny MLP).
  key = jax.random.key(config.seed)
  variables = jax.jit(init)(key, x)
  tx = make_optimizer(config)
  params = variables['params']
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    loss_state={},
    opt_state=tx.init(params),
  )
  return state._replace(loss_state=loss.init(variables_of(state), jax.random.fold_in(key, 1))), tx


def variables_of(state: TrainState) -> dict:
  """The Flax variables dict for `model.apply`."""
  if state.batch_stats:
    return {'params': state.params, 'batch_stats': state.batch_stats}
  return {'params': state.params}


def make_train_step(model, tx, loss: Loss = CROSS_ENTROPY, *, seed: int = 0) -> Callable:
  """Jitted `train_step(state, batch) -> (state, metrics)`: `loss` on the training forward pass
  (batch statistics, dropout key from (seed, step)), one optimiser update."""
  base_key = jax.random.key(seed)
  takes_train = _takes_train(model)

  def loss_fn(params, state, batch, rng):
    variables = {**variables_of(state), 'params': params}
    kwargs = dict(train=True) if takes_train else {}
    logits, updates = model.apply(
      variables, batch['image'], rngs={'dropout': rng}, mutable=['batch_stats'], **kwargs
    )
    stats = updates.get('batch_stats', state.batch_stats)
    now = {**variables, **({'batch_stats': stats} if state.batch_stats else {})}
    labels = batch['label']
    value, (loss_state, extra) = loss.fn(now, state.loss_state, logits, labels, state.step)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return value, ((stats, loss_state), {'loss': value, 'accuracy': acc, **extra})

  @jax.jit
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    grads, ((stats, loss_state), metrics) = grad_fn(state.params, state, batch, rng)
    upd, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, upd),
      batch_stats=stats,
      loss_state=loss_state,
      opt_state=opt_state,
    )
    metrics['grad_norm'] = optax.global_norm(grads)
    return new_state, metrics

  return train_step


def logits_fn(model, state: TrainState) -> Callable[[jax.Array], jax.Array]:
  """images -> logits at evaluation (running BN statistics)."""
  variables, fn = variables_of(state), apply_fn(model)
  return lambda x: fn(variables, x)


def describe_model(model) -> dict:
  """A Flax module's class and fields (its configuration), for run records."""
  fields = {}
  if dataclasses.is_dataclass(model):
    names = [f.name for f in dataclasses.fields(model) if f.name not in ('parent', 'name')]
    fields = {n: getattr(model, n) for n in names}
  return {'class': type(model).__name__, **(fields or {'repr': repr(model)})}


def logged_seconds(workdir: str) -> float:
  """Wall time of a run in `workdir` over all its invocations (compilation included), summed
  from `metrics.jsonl`; work redone after an interruption is not counted twice."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return float(sum(json.loads(line).get('time', 0.0) for line in f if line.strip()))


def params_fingerprint(state: TrainState) -> str:
  """Digest of the parameters and batch statistics (`data.fingerprint`): equal digests mean
  bit-identical models, e.g. a resumed run and an uninterrupted one."""
  leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
  return data.fingerprint(*(np.asarray(a) for a in leaves))


def train(
  model,
  config: TrainConfig,
  images: np.ndarray,
  labels: np.ndarray,
  workdir: str,
  *,
  loss: Loss = CROSS_ENTROPY,
  mesh=None,
  log: Callable[[str], None] = print,
  until: Callable[[TrainState], bool] | None = None,
  on_log: Callable[[int, TrainState, list[dict]], dict] | None = None,
) -> TrainState:
  """Trains (or resumes) for `config.steps` steps; returns the final state.

  With `until`, training also stops (and checkpoints) at the first logging step, every
  `config.log_every` steps, where `until(state)` is true, e.g. a training-loss criterion; a
  resumed run whose checkpoint already meets it returns at once. With a schedule that does not
  depend on `config.steps` ('constant'), the stopped state is the one a longer run would pass.
  `on_log(step, state, window) -> dict` adds fields to each logging step's record (e.g. a test
  evaluation; its time is recorded as `on_log_time`, not in the training `time`).

  Writes `workdir/run.json` (the model, `config` and a fingerprint of the data: a later call
  resumes only the same run), `workdir/metrics.jsonl` (exactly one line per logging step, also
  across interruptions: lines past the checkpoint a run resumes from are dropped, as those
  steps are redone) and orbax checkpoints in `workdir/checkpoints` every
  `config.checkpoint_every` steps and at the end. With a `mesh` (axis 'data'), each global
  batch is sharded over it and the state is replicated.

  Raises:
    InvalidInput: non-finite images, or labels outside [0, K) for the model's K outputs.
    WorkdirMismatch: `workdir` holds another model, configuration or data (nothing touched).
    TrainingDiverged: the loss became NaN/Inf; the last checkpoint saved is the last good one.
  """
  checks.check_images(images, pixel_range=None)
  state, tx = create_state(model, config, images.shape[1:], loss)
  checks.check_labels_for(logits_fn(model, state), images, labels)
  claim = functools.partial(
    record.open_run,
    workdir,
    'train_lib.train',
    {**dataclasses.asdict(config), **loss.config, 'model': describe_model(model)},
    {'examples': len(images), 'fingerprint': data.fingerprint(images, labels)},
    neutral=('log_every', 'checkpoint_every', 'max_checkpoints'),
    how='use a new workdir',
  )
  if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  if loop.is_shared(state):
    distributed.in_turn(claim, 'train_lib.train: run.json')  # process 0 writes, others check
  else:  # this process's own run (a mesh of its devices, or none)
    claim()

  def batches(epoch):
    for b in data.epoch_batches(images, labels, config.batch_size, seed=config.seed, epoch=epoch):
      yield data.shard_batch(b, mesh)

  schedule = loop.Schedule(
    config.steps,
    data.steps_per_epoch(len(images), config.batch_size),
    config.log_every,
    config.checkpoint_every,
    config.max_checkpoints,
  )
  train_step = make_train_step(model, tx, loss, seed=config.seed)
  shown = ('loss', 'accuracy', *loss.shown)
  state, _ = loop.run(state, train_step, batches, schedule, workdir, shown=shown, until=until,
                      on_log=on_log, log=log)  # fmt: skip
  return state
