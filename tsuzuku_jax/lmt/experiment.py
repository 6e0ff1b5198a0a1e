"""The LMT experiment: train with the Lipschitz-margin loss (and a plain baseline), certify,
attack, plot; `run(Config(...), workdir)` from a notebook, or `experiments/lmt.py` from flags.

`run` trains the LMT model (and, with `baseline`, the same model with plain cross-entropy) in
WORKDIR/lmt and WORKDIR/baseline (resuming from their checkpoints), certifies both with sound
bounds from the jaxpr analysis (`lmt.certificate`), attacks them with PGD inside and outside
the certified radii, and writes WORKDIR/results.json and WORKDIR/certified_accuracy.png.
WORKDIR/run.json records the run: a later call resumes only the same configuration and data.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import ClassVar

import jax
import numpy as np

from tsuzuku_jax import data, distributed, loop, models, train_lib, workdir
from tsuzuku_jax.lmt.analysis import certificate
from tsuzuku_jax.lmt.margins import FORMS, VARIANTS, training_loss
from tsuzuku_jax.lmt.radii import certify_dataset, robustness_report, segment_report

MODELS = ('mlp', 'cnn', 'wrn', 'liresnet')
# Settings that cannot change a result (recorded, but a resume may change them).
NEUTRAL = ('log_every', 'checkpoint_every', 'data_dir', 'overwrite', 'workdir')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines an LMT run (the launcher's flags, one field each; a field's
  comment is its flag's help)."""

  CHOICES: ClassVar[dict] = dict(
    model=MODELS, optimizer=train_lib.OPTIMIZERS, schedule=train_lib.SCHEDULES, form=FORMS,
    variant=VARIANTS, activation=('minmax', 'relu'),
  )  # fmt: skip

  dataset: str = 'digits'  # digits | mnist | cifar10 | npz:PATH
  data_dir: str | None = None  # tensorflow_datasets data_dir
  model: str = 'mlp'  # architecture
  hidden: tuple[int, ...] = (256, 256)  # MLP hidden widths
  channels: tuple[int, ...] = (32, 64)  # CNN channels per stage
  dense: int = 128  # CNN / LiResNet dense width
  batch_norm: bool = True  # CNN: conv + batch norm
  depth: int = 16  # WRN depth; LiResNet: number of residual blocks
  width: int = 4  # WRN width factor; LiResNet: channels
  # CNN, LiResNet: 'minmax' (GroupSort 2) or 'relu' (default: relu for the CNN, minmax for
  # LiResNet)
  activation: str | None = None
  kernel: int = 3  # CNN kernel size
  strides: int = 1  # CNN conv strides (> 1: strided convs, no max pooling)
  dropout: float = 0.0  # WRN dropout
  normalize: bool = False  # per-channel standardisation inside the model
  steps: int = 2000  # training steps
  batch_size: int = 128  # global batch size
  optimizer: str = 'adam'  # optimiser
  learning_rate: float = 1e-3  # peak learning rate
  schedule: str = 'cosine'  # learning-rate schedule
  warmup_steps: int = 0  # learning-rate warm-up steps
  weight_decay: float = 0.0  # weight decay
  c: float = 0.5  # LMT margin scale (> 0)
  c_warmup_steps: int = 0  # steps over which c ramps up from 1e-5
  form: str = 'pairwise'  # bound form used in training
  variant: str = 'lmt'  # margin loss variant
  clip: bool = False  # clip the margin as the released LMT code did
  seed: int = 0  # random seed (initialisation and data order)
  eps: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)  # L2 radii to report
  baseline: bool = True  # also train the plain cross-entropy model
  pgd_steps: int = 40  # PGD steps
  pgd_restarts: int = 4  # PGD random restarts
  attack_examples: int = 1000  # test points attacked by PGD
  # steps between certified accuracies of the current model on the test set during training (the
  # curve of certified accuracy against training time in results.json; 0: none)
  certify_every: int = 0
  log_every: int = 200  # steps between progress lines
  checkpoint_every: int = 1000  # steps between checkpoints

  def __post_init__(self):
    """One message per bad field, naming it (the launcher prefixes '--')."""
    checks = [
      (self.model in MODELS, f'model must be one of {MODELS}, got {self.model!r}'),
      (self.c > 0, f'c must be positive, got {self.c}'),
      (self.form in FORMS, f'form must be one of {FORMS}, got {self.form!r}'),
      (self.variant in VARIANTS, f'variant must be one of {VARIANTS}, got {self.variant!r}'),
      (bool(self.eps) and all(e >= 0 for e in self.eps),
       f'eps must be non-negative radii, got {self.eps}'),
      (all(h > 0 for h in self.hidden), f'hidden must be positive integers, got {self.hidden}'),
      (all(c > 0 for c in self.channels),
       f'channels must be positive integers, got {self.channels}'),
      (self.model != 'wrn' or (self.depth >= 10 and (self.depth - 4) % 6 == 0),
       f'depth of a WideResNet must be 6n + 4 >= 10, got {self.depth}'),
      (self.model != 'liresnet' or self.depth >= 0,
       f'depth (LiResNet blocks) must be >= 0, got {self.depth}'),
      (self.model != 'liresnet' or (self.width >= 2 and
                                    (self.activation == 'relu' or self.width % 2 == 0)),
       'width (LiResNet channels) must be a positive even number for activation=minmax, '
       f'got {self.width}'),
      (self.dense >= 1, f'dense must be positive, got {self.dense}'),
      (self.kernel >= 1 and self.strides >= 1,
       f'kernel and strides must be positive, got {self.kernel} and {self.strides}'),
      (self.model != 'cnn' or self.activation != 'minmax' or
       (all(c % 2 == 0 for c in self.channels) and self.dense % 2 == 0),
       f'activation=minmax sorts channel pairs: channels and dense must be even, got '
       f'{self.channels} and {self.dense}'),
      (self.attack_examples >= 0, f'attack_examples must be >= 0, got {self.attack_examples}'),
      (self.certify_every >= 0, f'certify_every must be >= 0, got {self.certify_every}'),
      (self.certify_every == 0 or self.certify_every % self.log_every == 0,
       f'certify_every must be a multiple of log_every={self.log_every}, got '
       f'{self.certify_every}'),
    ]  # fmt: skip
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    self.train_config()  # steps, batch_size, optimizer, schedule, ...

  def train_config(self) -> train_lib.TrainConfig:
    names = {f.name for f in dataclasses.fields(train_lib.TrainConfig)} - {'max_checkpoints'}
    return train_lib.TrainConfig(**{n: getattr(self, n) for n in names})


def build_model(config: Config, num_classes: int, images: np.ndarray):
  """The configured plain Flax model (standardised by the training images' channel statistics
  when `normalize`)."""
  norm = {}
  if config.normalize:
    norm = dict(mean=tuple(images.mean((0, 1, 2))), std=tuple(images.std((0, 1, 2))))
  if config.model == 'mlp':
    return models.MLP(num_classes, hidden=tuple(config.hidden), **norm)
  if config.model == 'cnn':
    return models.CNN(num_classes, tuple(config.channels), config.dense, config.batch_norm,
                      activation=config.activation or 'relu', kernel=config.kernel,
                      strides=config.strides, **norm)  # fmt: skip
  if config.model == 'liresnet':
    return models.LiResNet(num_classes, config.width, config.depth, dense=config.dense,
                           activation=config.activation or 'minmax', **norm)  # fmt: skip
  return models.WideResNet(num_classes, config.depth, config.width, config.dropout, **norm)


def _certified_now(config, apply_fn, input_shape, test):
  """`on_log` of training: every `certify_every` steps (and at the end), the current model's
  clean and certified accuracy (pairwise, sound certificate) on the test set."""

  def on_log(step, state, window):
    if step % config.certify_every and step != config.steps:
      return {}
    variables = train_lib.variables_of(jax.device_get(state))
    with jax.default_matmul_precision('highest'):
      cert = certificate(apply_fn, variables, input_shape)
      quiet = lambda line: None  # noqa: E731
      radii = certify_dataset(apply_fn, variables, cert, *test, list(config.eps), log=quiet)
    acc = radii.forms['pairwise'].certified_accuracy
    out = {'test_clean': float(np.mean(radii.correct))}
    return out | {f'test_certified_{e:g}': float(a) for e, a in zip(config.eps, acc, strict=True)}

  return on_log


def _curve(path: str, eps) -> list[dict]:
  """Certified accuracy against training time, from metrics.jsonl's `certify_every` records."""
  out, seconds = [], 0.0
  for rec in loop.read_records(path):
    seconds += rec.get('time', 0.0)
    if 'test_clean' in rec:
      cert = {f'{e:g}': rec[f'test_certified_{e:g}'] for e in eps}
      out.append({'step': rec['step'], 'train_seconds': seconds, 'clean': rec['test_clean'],
                  'certified': cert})  # fmt: skip
  return out


def _train_and_report(config, name, loss, model, splits, path, mesh, log):
  """Trains one model (resuming), then its certificate, robustness report and segments."""
  (xtr, ytr), (xte, yte) = splits
  log(f'== training {name} ({config.steps} steps) on {config.dataset}')
  on_log = None
  if config.certify_every:
    on_log = _certified_now(config, train_lib.apply_fn(model), xtr.shape[1:], (xte, yte))
  try:
    state = train_lib.train(model, config.train_config(), xtr, ytr, path, loss=loss, mesh=mesh,
                            log=log, on_log=on_log)  # fmt: skip
  except train_lib.TrainingDiverged as e:
    raise train_lib.TrainingDiverged(f'{name} run diverged: {e}') from None
  state = jax.device_get(state)
  variables, apply_fn = train_lib.variables_of(state), train_lib.apply_fn(model)
  with jax.default_matmul_precision('highest'):
    cert = certificate(apply_fn, variables, xtr.shape[1:])
    full = robustness_report(
      apply_fn, variables, cert, xte, yte, list(config.eps), key=jax.random.key(config.seed + 1),
      attack_examples=config.attack_examples, steps=config.pgd_steps,
      restarts=config.pgd_restarts,
    )  # fmt: skip
  report = full.to_json()
  report['lipschitz'] = cert.lipschitz
  report['segments'] = segment_report(cert, key=jax.random.key(config.seed))
  report['train_seconds'] = train_lib.logged_seconds(path)  # over all invocations
  if config.certify_every:
    report['curve'] = _curve(path, config.eps)
  report['params_fingerprint'] = train_lib.params_fingerprint(state)
  return report, full.radii


def run(
  config: Config,
  path: str,
  *,
  overwrite: bool = False,
  log: Callable[[str], None] = workdir.print_flushed,
  cli: bool = False,
) -> dict | None:
  """Runs (or resumes, or finds complete) the experiment in `path`; returns the results dict
  (None when `path` already holds this run complete: its results.json is the answer).

  `cli`: name settings as flags ('--c') in messages, as the launcher does.

  Raises:
    workdir.WorkdirMismatch: `path` holds another experiment, configuration or data (nothing
      touched). InvalidInput, CheckpointMismatch, TrainingDiverged: as `train_lib.train`.
  """
  from tsuzuku_jax import plotting  # matplotlib: only when an experiment runs

  splits = [data.load(config.dataset, s, data_dir=config.data_dir) for s in ('train', 'test')]
  (xtr, ytr), (xte, yte) = splits
  identity = data.identity(config.dataset, train=(xtr, ytr), test=(xte, yte))
  record = dataclasses.asdict(config)
  if workdir.claim_experiment(path, 'lmt', record, identity, neutral=NEUTRAL,
                              overwrite=overwrite, cli=cli, log=log):  # fmt: skip
    return None
  results_path = os.path.join(path, 'results.json')
  model = build_model(config, data.num_classes(ytr), xtr)
  mesh = data.data_mesh() if jax.device_count() > 1 else None
  losses = {'lmt': training_loss(
    train_lib.apply_fn(model), xtr.shape[1:], c=config.c, c_warmup_steps=config.c_warmup_steps,
    form=config.form, variant=config.variant, clip=config.clip,
  )}  # fmt: skip
  if config.baseline:
    losses['baseline'] = train_lib.CROSS_ENTROPY
  results = {'dataset': config.dataset, 'model': repr(model), 'eps': list(config.eps)}
  results['config'] = dataclasses.asdict(config)
  curves, marks, grid = {}, {}, np.linspace(0, max(config.eps) * 1.5, 200)
  for name, loss in losses.items():
    report, radii = _train_and_report(
      config, name, loss, model, splits, os.path.join(path, name), mesh, log
    )
    for form in FORMS:
      acc = plotting.certified_accuracy_curve(radii.forms[form].radius, radii.correct, grid)
      curves[f'{name} (certified, {form})'] = (grid, acc)
    pgd = report['pgd_robust_accuracy']
    marks[f'{name} (PGD robust)'] = (list(config.eps), [pgd[f'{e:g}'] for e in config.eps])
    results[name] = report
    cert = report['certified_accuracy']['pairwise']
    log(
      f'{name}: clean {report["clean_accuracy"]:.4f} certified(pairwise) '
      + ' '.join(f'{k}:{v:.4f}' for k, v in cert.items())
      + f' violations {report["violations"]}'
    )
  if distributed.is_primary():  # one writer of the shared files in a multi-process job
    plotting.plot_certified_accuracy(curves, os.path.join(path, 'certified_accuracy.png'),
                                     title=config.dataset, marks=marks)  # fmt: skip
    workdir.write_json(results_path, {'experiment': 'lmt', **results})
  log(f'wrote {results_path}')
  return results
