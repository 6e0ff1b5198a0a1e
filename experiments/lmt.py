r"""Lipschitz-margin training, certification and attack, from flags.

  python experiments/lmt.py --flagfile=experiments/configs/lmt_digits.flags \
      --workdir=runs/lmt_digits

Trains the LMT model (and, with --baseline, the same model with plain cross-entropy) in
WORKDIR/lmt and WORKDIR/baseline (resuming from their checkpoints), certifies both with sound
bounds from the jaxpr analysis of the model (`lmt.certificate`), attacks them with PGD, and
writes WORKDIR/results.json and WORKDIR/certified_accuracy.png. WORKDIR/run.json records the
run: a later invocation resumes only the same flags and data (see experiments/common.py).
"""

import os

import common
import numpy as np
from absl import app, flags, logging

from tsuzuku_jax import data, lmt, models, plotting, train_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, results).')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'digits | mnist | cifar10 | npz:PATH.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tensorflow_datasets data_dir.')
_MODEL = flags.DEFINE_enum('model', 'mlp', ['mlp', 'cnn', 'wrn', 'liresnet'], 'Architecture.')
_HIDDEN = flags.DEFINE_list('hidden', ['256', '256'], 'MLP hidden widths.')
_CHANNELS = flags.DEFINE_list('channels', ['32', '64'], 'CNN channels per stage.')
_DENSE = flags.DEFINE_integer('dense', 128, 'CNN dense width.')
_BATCH_NORM = flags.DEFINE_bool('batch_norm', True, 'CNN: conv + batch norm.')
_DEPTH = flags.DEFINE_integer('depth', 16, 'WRN depth; LiResNet: number of residual blocks.')
_WIDTH = flags.DEFINE_integer('width', 4, 'WRN width factor; LiResNet: channels.')
_ACTIVATION = flags.DEFINE_enum('activation', 'minmax', ['minmax', 'relu'], 'LiResNet activation.')
_DROPOUT = flags.DEFINE_float('dropout', 0.0, 'WRN dropout.')
_NORMALIZE = flags.DEFINE_bool('normalize', False, 'Per-channel standardisation inside the model.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_OPT = flags.DEFINE_enum('optimizer', 'adam', ['adam', 'sgd'], 'Optimiser.')
_LR = flags.DEFINE_float('learning_rate', 1e-3, 'Peak learning rate.')
_SCHEDULE = flags.DEFINE_enum('schedule', 'cosine', ['cosine', 'constant', 'step'], 'LR schedule.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 0, 'LR warm-up steps.')
_WD = flags.DEFINE_float('weight_decay', 0.0, 'Weight decay.')
_C = flags.DEFINE_float('c', 0.5, 'LMT margin scale c (> 0).')
_C_WARMUP = flags.DEFINE_integer('c_warmup_steps', 0, 'Steps over which c ramps up from 1e-5.')
_FORM = flags.DEFINE_enum('form', 'pairwise', list(lmt.FORMS), 'Bound form used in training.')
_VARIANT = flags.DEFINE_enum('variant', 'lmt', list(lmt.VARIANTS), 'Margin loss variant.')
_CLIP = flags.DEFINE_bool('clip', False, 'Clip the margin as the released LMT code did.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_EPS = flags.DEFINE_list('eps', ['0.1', '0.3', '0.5', '1.0'], 'L2 radii to report.')
_BASELINE = flags.DEFINE_bool('baseline', True, 'Also train the plain cross-entropy model.')
_PGD_STEPS = flags.DEFINE_integer('pgd_steps', 40, 'PGD steps.')
_PGD_RESTARTS = flags.DEFINE_integer('pgd_restarts', 4, 'PGD random restarts.')
_ATTACK_N = flags.DEFINE_integer('attack_examples', 1000, 'Test points attacked by PGD.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 200, 'Steps between progress lines.')
_CKPT_EVERY = flags.DEFINE_integer('checkpoint_every', 1000, 'Steps between checkpoints.')


def _validate():
  """One clear line per bad flag, before any work."""
  common.check_workdir()
  try:
    data.validate_name(_DATASET.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f'--dataset: {e}') from None
  if _C.value <= 0:
    raise app.UsageError(f'--c must be positive, got {_C.value}')
  try:
    eps = [float(e) for e in _EPS.value]
  except ValueError:
    raise app.UsageError(
      f'--eps must be a comma-separated list of numbers, got {_EPS.value}'
    ) from None
  if not eps or any(e < 0 for e in eps):
    raise app.UsageError(f'--eps must be non-negative radii, got {_EPS.value}')
  for name, flag in (('hidden', _HIDDEN), ('channels', _CHANNELS)):
    if not all(v.isdigit() and int(v) > 0 for v in flag.value):
      raise app.UsageError(f'--{name} must be positive integers, got {flag.value}')
  if _MODEL.value == 'wrn' and (_DEPTH.value < 10 or (_DEPTH.value - 4) % 6):
    raise app.UsageError(f'--depth of a WideResNet must be 6n + 4 >= 10, got {_DEPTH.value}')
  if _MODEL.value == 'liresnet':
    if _DEPTH.value < 0:
      raise app.UsageError(f'--depth (LiResNet blocks) must be >= 0, got {_DEPTH.value}')
    if _WIDTH.value < 2 or (_ACTIVATION.value == 'minmax' and _WIDTH.value % 2):
      raise app.UsageError(
        f'--width (LiResNet channels) must be a positive even number for --activation=minmax, '
        f'got {_WIDTH.value}'
      )
  if _DENSE.value < 1:
    raise app.UsageError(f'--dense must be positive, got {_DENSE.value}')
  return eps


def _model(num_classes, images):
  norm = {}
  if _NORMALIZE.value:
    norm = dict(mean=tuple(images.mean((0, 1, 2))), std=tuple(images.std((0, 1, 2))))
  if _MODEL.value == 'mlp':
    return models.MLP(num_classes, hidden=tuple(int(h) for h in _HIDDEN.value), **norm)
  if _MODEL.value == 'cnn':
    ch = tuple(int(c) for c in _CHANNELS.value)
    return models.CNN(num_classes, ch, _DENSE.value, _BATCH_NORM.value, **norm)
  if _MODEL.value == 'liresnet':
    return models.LiResNet(
      num_classes, _WIDTH.value, _DEPTH.value, dense=_DENSE.value, activation=_ACTIVATION.value,
      **norm,
    )  # fmt: skip
  return models.WideResNet(num_classes, _DEPTH.value, _WIDTH.value, _DROPOUT.value, **norm)


def main(argv):
  del argv
  eps = _validate()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  import jax  # after flag validation: a bad flag costs no start-up time

  xtr, ytr = data.load(_DATASET.value, 'train', data_dir=_DATA_DIR.value)
  xte, yte = data.load(_DATASET.value, 'test', data_dir=_DATA_DIR.value)
  identity = data.identity(_DATASET.value, train=(xtr, ytr), test=(xte, yte))
  if common.open_workdir('lmt', identity, neutral=('log_every', 'checkpoint_every')):
    return
  model = _model(data.num_classes(ytr), xtr)
  mesh = data.data_mesh() if jax.device_count() > 1 else None
  config = train_lib.TrainConfig(
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    optimizer=_OPT.value,
    learning_rate=_LR.value,
    schedule=_SCHEDULE.value,
    warmup_steps=_WARMUP.value,
    weight_decay=_WD.value,
    seed=_SEED.value,
    log_every=_LOG_EVERY.value,
    checkpoint_every=_CKPT_EVERY.value,
  )
  apply_fn = train_lib.apply_fn(model)
  margins = dict(c_warmup_steps=_C_WARMUP.value, form=_FORM.value, variant=_VARIANT.value)
  losses = {'lmt': lmt.training_loss(apply_fn, xtr.shape[1:], c=_C.value, clip=_CLIP.value,
                                     **margins)}  # fmt: skip
  if _BASELINE.value:
    losses['baseline'] = train_lib.CROSS_ENTROPY
  pgd = dict(steps=_PGD_STEPS.value, restarts=_PGD_RESTARTS.value)
  results = {'dataset': _DATASET.value, 'model': repr(model), 'eps': eps}
  results['flags'] = common.config()
  curves, marks = {}, {}
  for name, loss in losses.items():
    print(f'== training {name} ({config.steps} steps) on {_DATASET.value}', flush=True)
    path = os.path.join(_WORKDIR.value, name)
    try:
      state = train_lib.train(model, config, xtr, ytr, path, loss=loss, mesh=mesh)
    except train_lib.TrainingDiverged as e:
      raise train_lib.TrainingDiverged(f'{name} run diverged: {e}') from None
    state = jax.device_get(state)
    variables = train_lib.variables_of(state)
    with jax.default_matmul_precision('highest'):
      cert = lmt.certificate(apply_fn, variables, xtr.shape[1:])
      report = lmt.robustness_report(
        apply_fn,
        variables,
        cert,
        xte,
        yte,
        eps,
        key=jax.random.key(_SEED.value + 1),
        attack_examples=_ATTACK_N.value,
        **pgd,
      )
    report['lipschitz'] = cert.lipschitz
    report['segments'] = lmt.segment_report(cert)
    report['train_seconds'] = train_lib.logged_seconds(path)  # over all invocations
    report['params_fingerprint'] = train_lib.params_fingerprint(state)
    radius, correct = report.pop('_radius'), report.pop('_correct')
    grid = np.linspace(0, max(eps) * 1.5, 200)
    for form in lmt.FORMS:
      curves[f'{name} ({form})'] = (
        grid,
        plotting.certified_accuracy_curve(radius[form], correct, grid),
      )
    marks[f'{name} PGD'] = (eps, [report['pgd_robust_accuracy'][f'{e:g}'] for e in eps])
    results[name] = report
    cert = report['certified_accuracy']['pairwise']
    print(
      f'{name}: clean {report["clean_accuracy"]:.4f} certified(pairwise) '
      + ' '.join(f'{k}:{v:.4f}' for k, v in cert.items())
      + f' violations {report["violations"]}',
      flush=True,
    )
  plotting.plot_certified_accuracy(
    curves,
    os.path.join(_WORKDIR.value, 'certified_accuracy.png'),
    title=_DATASET.value,
    marks=marks,
  )
  common.write_results('lmt', results)


if __name__ == '__main__':
  common.run(main)
