"""PyTorch peer for the flatness benchmark: the same models, with the same weights, as plain
PyTorch functions, and PyTorch's Hessian-vector products of the same loss.

`forward(name, tensors, x)` mirrors `tsuzuku_jax.models` in evaluation mode: the MLP, the CNN
without batch norm and the pre-activation WideResNet, with the flax parameter paths as
dictionary keys, 'SAME' padding as the explicit (lo, hi) pads that
`lax.conv_general_dilated` uses (asymmetric for stride 2), and NHWC flattening. The benchmark
checks the loss and the HVP against ours before it times anything, so a port that drifts from
the flax models fails loudly instead of timing a different network.

Two PyTorch HVPs: double backward (`torch.autograd.grad` of <grad L, v> with
`create_graph=True`, what PyTorch users and PyHessian write), and forward over reverse with
`torch.func` (jvp of grad), the same order as ours.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util

from tsuzuku_jax.models import conv_pads


def to_torch(tree: dict, device: str) -> dict[str, torch.Tensor]:
  """Nested flax dict of arrays -> {'a/b/c': tensor} (copied, float32, on `device`)."""
  flat_tree = traverse_util.flatten_dict(tree, sep='/')
  return {
    k: torch.tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in flat_tree.items()
  }


def _conv(t: dict, name: str, x: torch.Tensor, strides=(1, 1), bias: bool = True):
  """NCHW conv with an HWIO kernel and flax's 'SAME' pads."""
  k = t[f'{name}/kernel']
  (hl, hh), (wl, wh) = conv_pads(x.shape[2:], k.shape[:2], strides, 'SAME')
  x = F.pad(x, (wl, wh, hl, hh))
  b = t[f'{name}/bias'] if bias else None
  return F.conv2d(x, k.permute(3, 2, 0, 1), b, stride=tuple(strides))


def _bn(t: dict, name: str, x: torch.Tensor, eps: float = 1e-5):
  """Batch norm with the running statistics (the flax models at train=False)."""
  scale = t[f'{name}/scale'] * torch.rsqrt(t[f'stats:{name}/var'] + eps)
  shift = t[f'{name}/bias'] - t[f'stats:{name}/mean'] * scale
  return x * scale[:, None, None] + shift[:, None, None]


def _dense(t: dict, name: str, x: torch.Tensor):
  return x @ t[f'{name}/kernel'] + t[f'{name}/bias']


def _nhwc_flatten(x: torch.Tensor) -> torch.Tensor:
  return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def forward(name: str, t: dict, x: torch.Tensor, config: dict) -> torch.Tensor:
  """Logits of model `name` ('mlp' | 'cnn' | 'wrn') for NHWC images `x`.

  `t` holds the parameters under their flax paths and the batch statistics under
  'stats:<path>'; `config` the architecture fields (hidden, channels, depth, width).
  """
  if name == 'mlp':
    h = x.reshape(x.shape[0], -1)
    for i in range(len(config['hidden'])):
      h = F.relu(_dense(t, f'dense{i}', h))
    return _dense(t, 'head', h)
  h = x.permute(0, 3, 1, 2)
  if name == 'cnn':
    for i in range(len(config['channels'])):
      h = F.relu(_conv(t, f'conv{i}', h))
      if h.shape[2] >= 2 and h.shape[3] >= 2:
        h = F.max_pool2d(h, 2)
    return _dense(t, 'head', F.relu(_dense(t, 'dense', _nhwc_flatten(h))))
  n = (config['depth'] - 4) // 6
  h = _conv(t, 'stem', h, bias=False)
  for g, c in enumerate((16 * config['width'], 32 * config['width'], 64 * config['width'])):
    for i in range(n):
      blk, s = f'group{g}_block{i}', (2, 2) if g > 0 and i == 0 else (1, 1)
      o = F.relu(_bn(t, f'{blk}/bn1', h))
      sc = _conv(t, f'{blk}/shortcut', o, s, bias=False) if h.shape[1] != c or s != (1, 1) else h
      b = F.relu(_bn(t, f'{blk}/bn2', _conv(t, f'{blk}/conv1', o, s, bias=False)))
      h = _conv(t, f'{blk}/conv2', b, bias=False) + sc
  h = F.relu(_bn(t, 'bn', h)).mean(dim=(2, 3))
  return _dense(t, 'head', h)


class Peer:
  """The loss of one model on one batch as a function of its parameters, and its HVPs."""

  def __init__(self, name, config, variables, x, y, device: str):
    self.device = device
    self.params = to_torch(variables['params'], device)
    stats = to_torch(variables.get('batch_stats', {}), device)
    self.stats = {f'stats:{k}': v for k, v in stats.items()}
    self.keys = list(self.params)
    self.x = torch.tensor(np.asarray(x), device=device)
    self.y = torch.tensor(np.asarray(y), dtype=torch.long, device=device)
    self.name, self.config = name, config

  def loss(self, params: dict) -> torch.Tensor:
    logits = forward(self.name, {**params, **self.stats}, self.x, self.config)
    return F.cross_entropy(logits, self.y)

  def probe(self, tree: dict) -> dict[str, torch.Tensor]:
    """A flax-shaped probe (e.g. ours) as a tensor dict keyed like the parameters, in their
    order (torch.func compares dict structures key order included)."""
    d = to_torch(tree, self.device)
    return {k: d[k] for k in self.keys}

  def _leaves(self) -> list[torch.Tensor]:
    """Fresh autograd leaves sharing the parameters' storage, in `keys` order."""
    return [self.params[k].detach().requires_grad_() for k in self.keys]

  def grad_fn(self) -> Callable[[], tuple]:
    leaves = self._leaves()

    def grad():
      loss = self.loss(dict(zip(self.keys, leaves, strict=True)))
      return torch.autograd.grad(loss, leaves)

    return grad

  def double_backward_hvp(self) -> Callable[[dict], tuple]:
    leaves = self._leaves()

    def hvp(v: dict):
      loss = self.loss(dict(zip(self.keys, leaves, strict=True)))
      g = torch.autograd.grad(loss, leaves, create_graph=True)
      dot = sum((gi * v[k]).sum() for gi, k in zip(g, self.keys, strict=True))
      return torch.autograd.grad(dot, leaves)

    return hvp

  def forward_over_reverse_hvp(self) -> Callable[[dict], dict]:
    params = {k: p.detach() for k, p in self.params.items()}
    grad = torch.func.grad(self.loss)

    def hvp(v: dict):
      return torch.func.jvp(grad, (params,), (v,))[1]

    return hvp

  def sync(self) -> None:
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()


def flat(tensors, keys: list[str]) -> np.ndarray:
  """A tuple (in the order of `keys`) or a dict keyed by `keys` -> one float64 vector."""
  parts = [tensors[k] for k in keys] if isinstance(tensors, dict) else tensors
  return np.concatenate([t.detach().cpu().double().numpy().ravel() for t in parts])
