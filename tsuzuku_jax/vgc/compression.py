"""Gradient compression with error feedback, as optax-style `(init, update)` pairs on pytrees.

Each worker of a data-parallel job keeps, per parameter element i, a residual `r_i` (gradient
not yet sent) and, for the variance-based method, an accumulated variance estimate `v_i`.
`update(grads, state, variance)` adds the new gradient to `r`, chooses what to send, encodes it
into a fixed-capacity message per tensor, and subtracts the *decoded* value of everything sent
from `r` (error feedback), so nothing is lost: sent + new residual == old residual + gradient.

Methods (`make(method, ...)`):
  'dense'   no compression: the message is the gradient (exchanged with `psum`).
  'vgc'     variance-based compression (Tsuzuku et al., 2018): send i when r_i^2 > alpha v_i.
  'strom'   Strom (2015): send i when |r_i| > tau, as sign(r_i) * tau.
  'hybrid'  an element must pass both the variance test and Strom's threshold.
  'topk'    top-k of |r| per tensor with error feedback (Stich et al. 2018; DGC without
            momentum correction).

Wire format (`SparseMessage`): one uint32 word per element, `(index << 4) | code`, where the
4-bit code is a sign bit (bit 3) and a 3-bit exponent e: the decoded value is
`(-1)^sign * scale * 2^-e`, with one float32 `scale` per tensor. With `quantize=False` the word
carries only the index and the value travels as float32 beside it (8 bytes per element).

Choices the paper leaves open, made here (reconstruction; see docs/vgc.md):
- Order per step: r += g and v += s; the test uses the accumulated v; sent elements get v = 0,
  every other element (including those that passed but did not fit) gets v *= zeta.
- Quantisation rounds magnitudes *down* to scale * 2^-e, scale = max |r| over the elements that
  passed the test in this tensor. So 0 < |Q(r)| <= |r| < 2 |Q(r)|: the residual keeps its sign and
  at least halves (a contractive compressor). Elements below scale * 2^-7 are not sent (sending
  scale * 2^-7 would overshoot them); they stay in r and keep accumulating.
- Capacity: each tensor has `ceil(capacity * size)` slots. When more elements pass, the ones
  sent are taken in index order starting from an offset that moves every step (so no region of
  a tensor starves); the rest stay in r and are counted as overflow.
- Strom's elements are sent as +-tau (code exponent 0, scale tau), as in the original method.
- Top-k sends raw float32 values by default (as DGC does); `quantize=True` codes them like VGC.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

METHODS = ('dense', 'vgc', 'strom', 'hybrid', 'topk')
MAX_INDEX_BITS = 28  # 32-bit word = 28-bit index + 4-bit code.
MAX_EXPONENT = 7
_OFFSET_STRIDE = 2654435761  # Knuth's multiplicative hash constant: offsets spread over a tensor.


class CompressState(NamedTuple):
  """Per-worker state; every tree has the structure of the parameters."""

  residual: Any  # float32 like each parameter: gradient accumulated and not yet sent (r).
  variance: Any  # float32 like each parameter: accumulated variance estimate (v); vgc/hybrid.
  count: jax.Array  # shape=(), int32: number of updates so far.


class SparseMessage(NamedTuple):
  """One tensor's message from one worker (static shapes; padding words carry index == size)."""

  words: jax.Array  # (capacity,) uint32: (index << 4) | code.
  values: jax.Array  # (capacity,) float32 raw values when not quantised, else (0,).
  scale: jax.Array  # () float32: magnitude of exponent 0 (vgc/hybrid/topk) or tau (strom).


@dataclasses.dataclass(frozen=True)
class Compressor:
  """An `(init, update)` pair; see `make`.

  `init(params) -> CompressState`.
  `update(grads, state, variance=None) -> (messages, new_state, stats)`: `messages` has the
  parameters' structure with a `SparseMessage` (or, for 'dense', the gradient) per leaf; `stats`
  is a dict of scalars for this worker and step: 'sent' and 'candidates' (elements),
  'overflow' (passed the test but beyond capacity), 'elements', and bytes 'dense_bytes',
  'static_bytes' (fixed-capacity exchange), 'ideal_bytes' (variable-size exchange).
  """

  method: str
  init: Callable[[Any], CompressState]
  update: Callable[..., tuple[Any, CompressState, dict]]
  needs_variance: bool
  capacity: float


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)


def slots(size: int, fraction: float) -> int:
  """Static number of message slots for a tensor of `size` elements."""
  # The 1e-9 keeps e.g. 0.07 * 100 = 7.000000000000001 at 7 slots.
  return max(1, min(size, math.ceil(fraction * size - 1e-9)))


def word_bytes(quantize: bool) -> int:
  """Bytes on the wire per sent element: one packed word, plus a float32 value if raw."""
  return 4 if quantize else 8


def quantize_magnitude(mag: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rounds |r| down to scale * 2^-e, e in 0..7.

  Args:
    mag: |r|, any shape.
    scale: () the largest magnitude to represent (exponent 0).

  Returns:
    `(e, in_range)`: int32 exponents and whether `mag >= scale * 2^-7` (representable without
    overshoot). Out-of-range entries get e = 7 but must not be sent.
  """
  # Exact and deterministic (no log2): e = number of levels scale * 2^-k, k = 0..7, above |r|.
  scale = jnp.asarray(scale, jnp.float32)
  e = sum((jnp.ldexp(scale, -k) > mag).astype(jnp.int32) for k in range(MAX_EXPONENT + 1))
  in_range = (mag > 0) & (e <= MAX_EXPONENT)
  return jnp.minimum(e, MAX_EXPONENT), in_range


def decode_values(words: jax.Array, scale: jax.Array) -> jax.Array:
  """Decoded value of each coded word: (-1)^sign * scale * 2^-e (scale broadcasts)."""
  code = (words & 15).astype(jnp.int32)
  sign = 1.0 - 2.0 * (code >> 3).astype(jnp.float32)
  return sign * jnp.ldexp(jnp.asarray(scale, jnp.float32), -(code & 7))


def unpack_index(words: jax.Array) -> jax.Array:
  return (words >> 4).astype(jnp.int32)


def _pack(index: jax.Array, code: jax.Array) -> jax.Array:
  return (index.astype(jnp.uint32) << 4) | jnp.asarray(code).astype(jnp.uint32)


def _compact(mask: jax.Array, capacity: int, offset: jax.Array) -> jax.Array:
  """Indices of up to `capacity` set entries of a flat mask, in index order from `offset`.

  Returns (capacity,) int32 indices; unused slots hold `mask.size` (the padding index).
  """
  d = mask.size
  ones = mask.astype(jnp.int32)
  # associative_scan: about 3x faster than jnp.cumsum (a reduce_window) on XLA:CPU.
  before_incl = jax.lax.associative_scan(jnp.add, ones)
  total = before_incl[-1]
  before_offset = jnp.where(offset > 0, before_incl[jnp.maximum(offset - 1, 0)], 0)
  i = jnp.arange(d, dtype=jnp.int32)
  rank = before_incl - 1 - before_offset
  rank = jnp.where(i >= offset, rank, rank + total)
  # Elements not kept target slot `capacity`, out of bounds: dropped, not written (no
  # contention on one dump address).
  slot = jnp.where(mask & (rank < capacity), rank, capacity)
  return jnp.full((capacity,), d, jnp.int32).at[slot].set(i, mode='drop')


def _encode(r_flat, index, valid, quantize, scale):
  """Words/values/decoded-values for the selected indices of one flat residual."""
  d = r_flat.size
  vals = jnp.where(valid, r_flat.at[index].get(mode='fill', fill_value=0.0), 0.0)
  if quantize:
    e, in_range = quantize_magnitude(jnp.abs(vals), scale)
    valid = valid & in_range
    code = jnp.where(vals < 0, 8, 0) + e
    index = jnp.where(valid, index, d)
    words = _pack(index, code)
    sent = jnp.where(valid, decode_values(words, scale), 0.0)
    return SparseMessage(words, jnp.zeros((0,), jnp.float32), scale), index, sent
  index = jnp.where(valid, index, d)
  return SparseMessage(_pack(index, 0), vals, scale), index, vals


def _leaf_update(method, alpha, zeta, tau, fraction, quantize, g, r, v, s, count):
  """One tensor: returns (message, r, v, stats)."""
  shape, d = r.shape, r.size
  cap = slots(d, fraction)
  r = (r + g.astype(jnp.float32)).reshape(-1)
  underflow = jnp.zeros((), jnp.int32)
  if method == 'topk':
    _, index = jax.lax.top_k(jnp.abs(r), cap)
    valid = r[index] != 0
    candidates = jnp.sum(r != 0)
    scale = jnp.max(jnp.abs(r[index])) if quantize else jnp.zeros(())
    msg, index, sent = _encode(r, index, valid, quantize, scale)
    v_new = v
  else:
    if method == 'strom':
      passed = jnp.abs(r) > tau
    else:
      v_acc = (v + s.astype(jnp.float32)).reshape(-1)
      passed = jnp.square(r) > alpha * v_acc
      if method == 'hybrid':
        passed = passed & (jnp.abs(r) > tau)
    passed = passed & (r != 0)
    if method == 'strom':
      scale = jnp.asarray(tau, jnp.float32)
    elif quantize:
      scale = jnp.max(jnp.where(passed, jnp.abs(r), 0.0))
      in_range = quantize_magnitude(jnp.abs(r), scale)[1]
      underflow = jnp.sum(passed & ~in_range)
      passed = passed & in_range
    else:
      scale = jnp.zeros(())
    candidates = jnp.sum(passed)
    offset = ((count.astype(jnp.uint32) * jnp.uint32(_OFFSET_STRIDE)) % jnp.uint32(d)).astype(
      jnp.int32
    )
    index = _compact(passed, cap, offset)
    valid = index < d
    if method == 'strom':
      # Sent as sign(r) * tau: exponent 0 of scale tau.
      code = jnp.where(r.at[index].get(mode='fill', fill_value=0.0) < 0, 8, 0)
      words = _pack(index, code)
      msg = SparseMessage(words, jnp.zeros((0,), jnp.float32), scale)
      sent = jnp.where(valid, decode_values(words, scale), 0.0)
      v_new = v
    else:
      msg, index, sent = _encode(r, index, valid, quantize, scale)
      v_new = (zeta * v_acc).at[index].set(0.0, mode='drop').reshape(shape)
  r = r.at[index].add(-sent, mode='drop')
  n_sent = jnp.sum(index < d)
  stats = {
    'sent': n_sent,
    'candidates': candidates,
    'overflow': jnp.maximum(candidates - n_sent, 0) if method != 'topk' else jnp.zeros((), int),
    'underflow': underflow,
    'elements': d,
    'dense_bytes': 4 * d,
    # Per tensor: the fixed slots plus its float32 scale (sent even when unused, as the
    # static all-gather does); the variable-size exchange sends only the used words plus the
    # scale and a 4-byte word count.
    'static_bytes': cap * word_bytes(quantize or method == 'strom') + 4,
    'ideal_bytes': n_sent * word_bytes(quantize or method == 'strom') + 8,
  }
  return msg, r.reshape(shape), v_new, stats


def make(
  method: str,
  *,
  alpha: float = 2.0,
  zeta: float = 0.999,
  tau: float = 0.01,
  density: float = 0.001,
  capacity: float = 0.05,
  quantize: bool | None = None,
) -> Compressor:
  """Builds a compressor.

  Args:
    method: one of `METHODS`.
    alpha: vgc/hybrid: send when r^2 > alpha * v (>= 0; 0 sends every nonzero element).
    zeta: vgc/hybrid: decay of v for elements not sent, in (0, 1].
    tau: strom/hybrid: threshold on |r| (> 0), in gradient units.
    density: topk: fraction of each tensor sent per step, in (0, 1].
    capacity: vgc/strom/hybrid: message slots per tensor as a fraction of its size, in (0, 1].
    quantize: 4-bit codes (True) or raw float32 values (False). Default: True for vgc/hybrid,
      False for topk; strom always sends +-tau codes.

  Raises:
    ValueError: an unknown method or a parameter out of range (the message names it).
  """
  _check(method in METHODS, f'method must be one of {METHODS}, got {method!r}')
  _check(alpha >= 0 and math.isfinite(alpha), f'alpha must be finite and >= 0, got {alpha}')
  _check(0 < zeta <= 1, f'zeta must be in (0, 1], got {zeta}')
  if method in ('strom', 'hybrid'):
    _check(tau > 0 and math.isfinite(tau), f'tau must be finite and > 0, got {tau}')
  _check(0 < density <= 1, f'density must be in (0, 1], got {density}')
  _check(0 < capacity <= 1, f'capacity must be a fraction in (0, 1], got {capacity}')
  if quantize is None:
    quantize = method in ('vgc', 'hybrid')
  fraction = density if method == 'topk' else capacity

  def init(params) -> CompressState:
    for path, p in jax.tree_util.tree_leaves_with_path(params):
      _check(
        p.size < 2**MAX_INDEX_BITS,
        f'parameter {jax.tree_util.keystr(path)} has {p.size} elements; a 32-bit word holds '
        f'indices < 2^{MAX_INDEX_BITS}: split the tensor',
      )
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    # Separate buffers for r and v, so that a jitted update may donate the state.
    variance = zeros() if method in ('vgc', 'hybrid') else jax.tree.map(lambda _: (), params)
    return CompressState(zeros(), variance, jnp.zeros((), jnp.int32))

  def update(grads, state: CompressState, variance=None):
    if method == 'dense':
      d = sum(g.size for g in jax.tree.leaves(grads))
      stats = {k: jnp.asarray(d) for k in ('sent', 'candidates', 'elements')}
      stats.update(
        overflow=jnp.asarray(0), underflow=jnp.asarray(0), dense_bytes=jnp.asarray(4 * d)
      )
      stats.update(static_bytes=jnp.asarray(4 * d), ideal_bytes=jnp.asarray(4 * d))
      return grads, state._replace(count=state.count + 1), stats
    if method in ('vgc', 'hybrid') and variance is None:
      raise ValueError(f'method {method!r} needs the variance estimate (see tsuzuku_jax.variance)')
    treedef = jax.tree.structure(grads)
    g_l, r_l = treedef.flatten_up_to(grads), treedef.flatten_up_to(state.residual)
    v_l = treedef.flatten_up_to(state.variance)
    s_l = treedef.flatten_up_to(variance) if variance is not None else [None] * len(g_l)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    for path, g, r, s in zip(paths, g_l, r_l, s_l, strict=True):
      for name, a in (('gradient', g), ('variance', s)):
        if a is not None and a.shape != r.shape:
          raise ValueError(f'{name} {path} has shape {a.shape}, the parameter has {r.shape}')
    out = [
      _leaf_update(method, alpha, zeta, tau, fraction, quantize, g, r, v, s, state.count)
      for g, r, v, s in zip(g_l, r_l, v_l, s_l, strict=True)
    ]
    msgs, rs, vs, stats = zip(*out, strict=True)
    total = {k: sum(jnp.asarray(s[k]) for s in stats) for k in stats[0]}
    new = CompressState(treedef.unflatten(rs), treedef.unflatten(vs), state.count + 1)
    return treedef.unflatten(msgs), new, total

  return Compressor(method, init, update, method in ('vgc', 'hybrid'), fraction)


def message_values(message: SparseMessage) -> jax.Array:
  """The value of each slot of a message (or of stacked messages, scales broadcasting): the raw
  float32 values when it carries them, else its 4-bit codes decoded. The one decoder: `decode`
  and the all-reduce both use it."""
  if message.values.size:
    return message.values
  return decode_values(message.words, message.scale)


def decode(message: SparseMessage, size: int) -> jax.Array:
  """Dense flat (size,) float32 of one worker's message (padding words are dropped)."""
  index = unpack_index(message.words)
  return jnp.zeros((size,), jnp.float32).at[index].add(message_values(message), mode='drop')
