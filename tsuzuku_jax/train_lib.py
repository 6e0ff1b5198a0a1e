"""Training loop: TrainState, jitted train/eval steps, orbax checkpoint/resume, metrics.jsonl.

`train(model, config, images, labels, workdir)` trains a plain Flax model (`__call__(x)` or
`__call__(x, *, train)`, returning logits; batch norm statistics in the `batch_stats`
collection) with plain cross-entropy (`config.c == 0`) or Lipschitz-margin training
(`config.c > 0`, on the jaxpr analysis of the model in evaluation mode, `lmt.make_loss`). A run
restarted on the same workdir resumes from the last checkpoint and ends with the same
parameters as an uninterrupted run: the data order depends only on (seed, epoch) and the
dropout key only on (seed, step).
"""

import dataclasses
import functools
import inspect
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tsuzuku_jax import checks, data, lmt
from tsuzuku_jax import workdir as record


class TrainState(NamedTuple):
  step: jax.Array  # shape=(), int32: number of optimiser steps taken.
  params: Any
  batch_stats: Any  # running batch-norm statistics ({} for models without BN).
  lipschitz: Any  # LMT's power-iteration vectors, one per linear segment ({} without LMT).
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and LMT settings (the launcher builds it from flags)."""

  steps: int = 1000
  batch_size: int = 128
  optimizer: str = 'adam'  # 'adam' | 'sgd' (Nesterov momentum 0.9)
  learning_rate: float = 1e-3
  schedule: str = 'cosine'  # 'cosine' | 'constant' | 'step' (x0.1 at 50% and 75%)
  warmup_steps: int = 0
  weight_decay: float = 0.0
  c: float = 0.0  # LMT margin scale; 0 = plain cross-entropy (no bound work in the step).
  c_warmup_steps: int = 0
  form: str = 'pairwise'  # lmt.FORMS
  variant: str = 'lmt'  # lmt.VARIANTS
  clip: bool = False
  seed: int = 0
  log_every: int = 100
  checkpoint_every: int = 1000
  max_checkpoints: int = 2

  def __post_init__(self):
    checks = [
      (self.steps > 0, f'steps must be positive, got {self.steps}'),
      (self.batch_size > 0, f'batch_size must be positive, got {self.batch_size}'),
      (self.learning_rate > 0, f'learning_rate must be positive, got {self.learning_rate}'),
      (self.c >= 0, f'c must be >= 0, got {self.c}'),
      (self.optimizer in ('adam', 'sgd'), f'unknown optimizer {self.optimizer!r}'),
      (self.schedule in ('cosine', 'constant', 'step'), f'unknown schedule {self.schedule!r}'),
      (self.form in lmt.FORMS, f'form must be one of {lmt.FORMS}, got {self.form!r}'),
      (self.variant in lmt.VARIANTS, f'variant must be one of {lmt.VARIANTS}'),
      (self.checkpoint_every > 0, 'checkpoint_every must be positive'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of another model or optimiser (left untouched on disk)."""


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


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


def create_state(model, config: TrainConfig, input_shape) -> tuple[TrainState, Any]:
  """Initialises parameters, BN statistics, LMT's power-iteration vectors (when config.c > 0)
  and the optimiser state."""
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
    lipschitz={},
    opt_state=tx.init(params),
  )
  if config.c > 0:
    iterates = lmt.init_iterates(
      apply_fn(model), variables_of(state), input_shape, jax.random.fold_in(key, 1)
    )
    state = state._replace(lipschitz=iterates)
  return state, tx


def variables_of(state: TrainState) -> dict:
  """The Flax variables dict for `model.apply`."""
  if state.batch_stats:
    return {'params': state.params, 'batch_stats': state.batch_stats}
  return {'params': state.params}


def make_train_step(model, tx, config: TrainConfig, input_shape) -> Callable:
  """Jitted `train_step(state, batch) -> (state, metrics)`; LMT when config.c > 0 (the bounds
  estimated on the model in evaluation mode with this step's batch-norm statistics)."""
  use_lmt = config.c > 0
  c_sched = lmt.c_schedule(config.c, config.c_warmup_steps)
  base_key = jax.random.key(config.seed)
  lmt_loss = lmt.make_loss(
    apply_fn(model), input_shape, form=config.form, variant=config.variant, clip=config.clip
  )
  takes_train = _takes_train(model)

  def loss_fn(params, state, batch, rng):
    variables = {**variables_of(state), 'params': params}
    kwargs = dict(train=True) if takes_train else {}
    logits, updates = model.apply(
      variables, batch['image'], rngs={'dropout': rng}, mutable=['batch_stats'], **kwargs
    )
    updates = {'batch_stats': updates.get('batch_stats', state.batch_stats)}
    labels = batch['label']
    if use_lmt:
      c = c_sched(state.step)
      now = {**variables, **({'batch_stats': updates['batch_stats']} if state.batch_stats else {})}
      loss, (iterates, bounds) = lmt_loss(now, state.lipschitz, logits, labels, c)
      updates['lipschitz'] = iterates
      lip = jnp.max(lmt.pairwise_bounds(bounds, config.form))
    else:
      c = jnp.zeros(())
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
      lip = jnp.zeros(())
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates, {'loss': loss, 'accuracy': acc, 'c': c, 'lipschitz_estimate': lip})

  @jax.jit
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_key, state.step)
    grads, (updates, metrics) = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
    upd, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, upd),
      batch_stats=updates.get('batch_stats', state.batch_stats),
      lipschitz=updates.get('lipschitz', state.lipschitz),
      opt_state=opt_state,
    )
    metrics['grad_norm'] = optax.global_norm(grads)
    return new_state, metrics

  return train_step


def logits_fn(model, state: TrainState) -> Callable[[jax.Array], jax.Array]:
  """images -> logits at evaluation (running BN statistics)."""
  variables, fn = variables_of(state), apply_fn(model)
  return lambda x: fn(variables, x)


def _manager(workdir: str, config: TrainConfig):
  # orbax is imported here so the rest of the module (train steps, benchmarks) works without it.
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True)
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def restore_latest(workdir: str, state: TrainState, config: TrainConfig) -> TrainState:
  """The latest checkpoint in `workdir` (or `state` unchanged when there is none)."""
  import orbax.checkpoint as ocp

  mngr = _manager(workdir, config)
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
  # Compare the stored shapes first: a failed orbax restore leaves its async reads dangling.
  stored = sorted(str(tuple(m.shape)) for m in jax.tree.leaves(mngr.item_metadata(step)))
  wanted = sorted(str(tuple(a.shape)) for a in jax.tree.leaves(abstract))
  if stored != wanted:
    raise CheckpointMismatch(
      f'the checkpoint at step {step} in {workdir}/checkpoints does not match this model and '
      f'optimiser ({len(stored)} stored arrays vs {len(wanted)} expected, or different '
      'shapes); use a new --workdir'
    )
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    # Left untouched on disk: use another workdir for a different model or optimiser.
    raise CheckpointMismatch(
      f'the checkpoint at step {step} in {workdir}/checkpoints does not match this model and '
      f'optimiser ({type(e).__name__}: {str(e)[:300]}); use a new --workdir'
    ) from e
  return TrainState(**restored)


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


def _all_finite(metrics: dict) -> bool:
  return all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def train(
  model,
  config: TrainConfig,
  images: np.ndarray,
  labels: np.ndarray,
  workdir: str,
  *,
  mesh=None,
  log: Callable[[str], None] = print,
  until: Callable[[TrainState], bool] | None = None,
) -> TrainState:
  """Trains (or resumes) for `config.steps` steps; returns the final state.

  With `until`, training also stops (and checkpoints) at the first logging step, every
  `config.log_every` steps, where `until(state)` is true, e.g. a training-loss criterion; a
  resumed run whose checkpoint already meets it returns at once. With a schedule that does not
  depend on `config.steps` ('constant'), the stopped state is the one a longer run would pass.

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
  import orbax.checkpoint as ocp

  checks.check_images(images, pixel_range=None)
  state, tx = create_state(model, config, images.shape[1:])
  checks.check_labels_for(logits_fn(model, state), images, labels)
  record.open_run(
    workdir,
    'train_lib.train',
    {**dataclasses.asdict(config), 'model': describe_model(model)},
    {'examples': len(images), 'fingerprint': data.fingerprint(images, labels)},
    neutral=('log_every', 'checkpoint_every', 'max_checkpoints'),
    how='use a new workdir',
  )
  state = restore_latest(workdir, state, config)
  start = int(state.step)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  # Steps after the checkpoint are redone (identically): their old lines would repeat.
  record.trim_jsonl(metrics_path, lambda r: r.get('step', 0) <= start)
  if start:
    log(f'resumed from {workdir}/checkpoints at step {start}')
    if until is not None and until(state):
      return state
  if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  train_step = make_train_step(model, tx, config, images.shape[1:])
  mngr = _manager(workdir, config)
  per_epoch = data.steps_per_epoch(len(images), config.batch_size)
  step, t0, t_last, window, last = start, time.time(), time.time(), [], False
  try:
    with open(metrics_path, 'a') as metrics_file:
      while step < config.steps and not last:
        epoch, skip = divmod(step, per_epoch)
        batches = data.epoch_batches(
          images, labels, config.batch_size, seed=config.seed, epoch=epoch
        )
        for i, batch in enumerate(batches):
          if i < skip:
            continue
          state, metrics = train_step(state, data.shard_batch(batch, mesh))
          step += 1
          window.append(metrics)
          last = step == config.steps
          if step % config.log_every == 0 or last or step % config.checkpoint_every == 0:
            host = jax.device_get(window)
            window = []
            mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            if not all(_all_finite(m) for m in host):
              raise TrainingDiverged(
                f'loss is {mean["loss"]} at step {step}: stopping; the last good checkpoint '
                f'(step {mngr.latest_step()}) is kept in {workdir}/checkpoints'
              )
            now = time.time()
            rate = (step - start) / max(now - t0, 1e-9)
            eta = (config.steps - step) / max(rate, 1e-9)
            log(
              f'step {step}/{config.steps} loss {mean["loss"]:.4f} acc {mean["accuracy"]:.3f} '
              f'c {mean["c"]:.3g} {rate:.1f} steps/s ETA {eta:.0f}s'
            )
            metrics_file.write(json.dumps({'step': step, 'time': now - t_last, **mean}) + '\n')
            metrics_file.flush()
            t_last = now
            if until is not None and step % config.log_every == 0 and until(state):
              last = True
          if step % config.checkpoint_every == 0 or last:
            mngr.save(step, args=ocp.args.StandardSave(state._asdict()))
          if last:
            break
  finally:
    # Commit any checkpoint still being written, also when interrupted or diverged.
    mngr.wait_until_finished()
  return state
