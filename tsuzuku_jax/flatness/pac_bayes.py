"""PAC-Bayes bounds for Gaussian posteriors over network parameters.

With probability >= 1 - delta over an i.i.d. sample S of size m, for every posterior Q
(prior P fixed before seeing S):

- Langford-Seeger (Maurer's constant):
  kl(E_Q L_S || E_Q L_D) <= (KL(Q||P) + ln(2 sqrt(m)/delta)) / m,
  so E_Q L_D <= kl^-1(E_Q L_S, that right-hand side) (`langford_seeger`);
- McAllester (via Pinsker, looser): E_Q L_D <= E_Q L_S + sqrt((KL + ln(2 sqrt(m)/delta)) / (2m)).

E_Q L_S is itself estimated from sampled networks: with probability >= 1 - delta' it is at
most kl^-1(mean sampled error, ln(2/delta') / n) (Langford & Caruana's sample convergence
bound), n the number of independent draws: n networks each evaluated on all m examples
(`mc_certificate`), or n = rounds * m (network, example) pairs when every example gets its own
network in every round (`mc_certificate_from_counts`, far tighter for the same compute). Risks
are 0-1 errors in [0, 1]. The arithmetic is done in float64 numpy on the host: these are a
handful of scalars. Fitting and sampling a Gaussian
posterior, and certifying it with these bounds, is `flatness.posterior`.
"""

import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_unit(x, name: str) -> float:
  x = float(x)
  if not 0.0 <= x <= 1.0 or math.isnan(x):
    raise ValueError(f'{name} must be in [0, 1], got {x}')
  return x


def _check_delta(delta, name: str = 'delta') -> float:
  delta = float(delta)
  if not 0.0 < delta < 1.0:
    raise ValueError(f'{name} (a confidence parameter) must be in (0, 1), got {delta}')
  return delta


def _check_m(m, name: str = 'm') -> int:
  if int(m) != m or m < 1:
    raise ValueError(f'{name} (a sample size) must be a positive integer, got {m}')
  return int(m)


def _xlog_ratio(a: float, b: float, d: float) -> float:
  """a ln(a / b) for 0 < a, b <= 1, given d = a - b computed from the exact q and p.

  Near a = b it is a log1p(d / b), whose argument carries at most three roundings, so the
  result keeps its relative accuracy however small it is (ln of a rounded ratio near 1 would
  not); elsewhere |ln(a / b)| >= ln 2 and ln of the rounded ratio is as accurate, or, where
  the ratio overflows or is subnormal, ln a - ln b (then |ln(a / b)| > 708: no cancellation).
  """
  r = a / b
  if 0.5 <= r <= 2.0:
    return a * math.log1p(d / b)
  if sys.float_info.min <= r < math.inf:
    return a * math.log(r)
  return a * (math.log(a) - math.log(b))


def _kl_terms(q: float, p: float) -> tuple[float, float]:
  """The two terms q ln(q/p) and (1-q) ln((1-q)/(1-p)) of kl(q || p), in float64."""
  t1 = 0.0 if q == 0.0 else (math.inf if p == 0.0 else _xlog_ratio(q, p, q - p))
  t2 = 0.0 if q == 1.0 else (math.inf if p == 1.0 else _xlog_ratio(1.0 - q, 1.0 - p, p - q))
  return t1, t2


# Relative error allowance of a computed term: the inputs 1 - q, 1 - p, q - p (each at most one
# rounding), the division, log1p / log (< 1 ulp each in any libm worth the name) and the
# product stay below 8 ulp; 64 ulp leaves a wide margin at no cost in the 1e-9 accuracy.
_TERM_ERROR = 64 * 2.0**-52


def _kl_interval(q: float, p: float) -> tuple[float, float]:
  """(lo, hi) with lo <= kl(q || p) <= hi for the exact real kl at these float inputs."""
  t1, t2 = _kl_terms(q, p)
  value = t1 + t2
  if math.isinf(value):
    return value, value
  err = _TERM_ERROR * (abs(t1) + abs(t2)) + 1e-300  # + the final addition and underflow
  return value - err, value + err


def binary_kl(q, p) -> float:
  """kl(q || p) = q ln(q/p) + (1-q) ln((1-q)/(1-p)) in nats, with 0 ln 0 = 0 (inf where p
  is 0 or 1 and q is not), computed with log1p near q = p so that small values keep their
  relative accuracy."""
  q, p = _check_unit(q, 'q'), _check_unit(p, 'p')
  return max(sum(_kl_terms(q, p)), 0.0)


def _bisect(q, bound, inside, outside, iters):
  """Bisection between `inside` (kl(q || inside) <= bound possible) and `outside` (kl >= bound
  certain, the exact kl's rounding error allowed for), kl(q || .) being monotone between them.
  Returns the final `outside` end: a point where the true kl is provably >= bound, so a risk
  bound taken from it is rounded outward, whatever the float64 error of kl itself."""
  for _ in range(iters):
    mid = 0.5 * (inside + outside)
    if mid in (inside, outside):
      break
    if _kl_interval(q, mid)[0] >= bound:
      outside = mid
    else:
      inside = mid
  return outside


def _check_bound(bound) -> float:
  bound = float(bound)
  if math.isnan(bound):
    raise ValueError('bound is nan')
  return bound


def kl_inverse_upper(q, bound, iters: int = 2000) -> float:
  """sup {p in [q, 1] : kl(q || p) <= bound}, rounded up: never below the exact inverse.

  Guarantee: the returned p satisfies kl(q || p) >= bound for the exact real kl (or p = 1), so
  it is >= the exact inverse; it exceeds it by at most the kl's float64 error divided by the
  slope of kl there, plus one float spacing (< 1e-12 in practice; tested against 60-digit
  arithmetic). bound <= 0 gives q.
  """
  q, bound = _check_unit(q, 'q'), _check_bound(bound)
  if bound <= 0.0:
    return q
  if q == 1.0 or _kl_interval(q, 1.0)[0] < bound:
    return 1.0
  return _bisect(q, bound, q, 1.0, iters)


def kl_inverse_lower(q, bound, iters: int = 2000) -> float:
  """inf {p in [0, q] : kl(q || p) <= bound} (a lower bound on the true risk), rounded down:
  never above the exact inverse (same guarantee as `kl_inverse_upper`, mirrored). Bisected
  directly on [0, q], so that tiny answers keep their relative precision. bound <= 0 gives q.
  """
  q, bound = _check_unit(q, 'q'), _check_bound(bound)
  if bound <= 0.0:
    return q
  if q == 0.0 or _kl_interval(q, 0.0)[0] < bound:
    return 0.0
  return _bisect(q, bound, q, 0.0, iters)


def complexity(kl, m, delta) -> float:
  """(KL + ln(2 sqrt(m) / delta)) / m, the right-hand side of the Langford-Seeger bound."""
  kl = float(kl)
  if not kl >= 0.0:
    raise ValueError(f'KL(Q||P) must be >= 0, got {kl}')
  m, delta = _check_m(m), _check_delta(delta)
  return (kl + math.log(2.0 * math.sqrt(m) / delta)) / m


def langford_seeger(emp_risk, kl, m, delta) -> float:
  """Upper bound on the expected risk E_Q L_D from E_Q L_S = emp_risk and KL(Q||P)."""
  return kl_inverse_upper(_check_unit(emp_risk, 'emp_risk'), complexity(kl, m, delta))


def mcallester(emp_risk, kl, m, delta) -> float:
  """E_Q L_S + sqrt((KL + ln(2 sqrt(m)/delta)) / (2m)), capped at 1."""
  emp = _check_unit(emp_risk, 'emp_risk')
  return min(1.0, emp + math.sqrt(complexity(kl, m, delta) / 2.0))


def gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) -> float:
  """KL(N(mu_q, diag sigma_q^2) || N(mu_p, diag sigma_p^2)) over pytrees (or arrays); a scalar
  sigma broadcasts. 0.5 sum [(sigma_q^2 + (mu_q - mu_p)^2) / sigma_p^2 - 1 + ln(sigma_p^2 /
  sigma_q^2)], summed in float64."""

  def term(mq, sq, mp, sp):
    mq, sq, mp, sp = (np.asarray(a, np.float64) for a in (mq, sq, mp, sp))
    if np.any(sq <= 0) or np.any(sp <= 0):
      raise ValueError('standard deviations must be > 0')
    vq, vp = np.broadcast_to(sq**2, mq.shape), np.broadcast_to(sp**2, mq.shape)
    return 0.5 * float(np.sum((vq + (mq - mp) ** 2) / vp - 1.0 + np.log(vp / vq)))

  leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
  mq = leaves(mu_q)
  sq, mp, sp = (
    leaves(t) if len(leaves(t)) == len(mq) else [t] * len(mq) for t in (sigma_q, mu_p, sigma_p)
  )
  return sum(term(*a) for a in zip(mq, sq, mp, sp, strict=True))


def union_delta(delta, count) -> float:
  """The confidence each of `count` bounds gets when all must hold at once (union bound)."""
  return _check_delta(delta) / _check_m(count, 'count')


class Certificate(NamedTuple):
  """A Monte Carlo PAC-Bayes certificate of a stochastic classifier's expected error."""

  emp_mean: float  # mean 0-1 error of the sampled networks on the m examples
  emp_upper: float  # kl^-1(emp_mean, ln(2/delta_mc)/samples): >= E_Q L_S w.p. >= 1 - delta_mc
  samples: int  # independent draws: sampled networks, or (network, example) pairs
  kl: float  # KL(Q || P)
  bound: float  # Langford-Seeger at emp_upper: holds w.p. >= 1 - delta - delta_mc
  confidence: float  # 1 - delta - delta_mc


def mc_certificate(sampled_errors, kl, m, delta, delta_mc) -> Certificate:
  """A certificate of the stochastic classifier's expected error from n sampled networks.

  Args:
    sampled_errors: (n,) training 0-1 error of each network theta ~ Q (on all m examples).
    kl: KL(Q || P).
    m: training examples the bound is on.
    delta: confidence of the PAC-Bayes bound; delta_mc: of the sampling bound.

  Returns:
    The `Certificate`: emp_mean (mean sampled error), emp_upper (kl^-1(mean, ln(2/delta_mc)/n):
    with probability >= 1 - delta_mc an upper bound on E_Q L_S) and bound (Langford-Seeger at
    emp_upper: holds with probability >= 1 - delta - delta_mc).
  """
  errs = np.asarray(sampled_errors, np.float64).reshape(-1)
  if errs.size < 1 or np.any((errs < 0) | (errs > 1)) or not np.all(np.isfinite(errs)):
    raise ValueError('sampled_errors must be a non-empty array of errors in [0, 1]')
  delta_mc = _check_delta(delta_mc, 'delta_mc')
  mean = float(np.mean(errs))
  upper = kl_inverse_upper(mean, math.log(2.0 / delta_mc) / errs.size)
  return Certificate(
    emp_mean=mean,
    emp_upper=upper,
    samples=int(errs.size),
    kl=float(kl),
    bound=langford_seeger(upper, kl, m, delta),
    confidence=1.0 - delta - delta_mc,
  )


def mc_certificate_from_counts(errors, draws, kl, m, delta, delta_mc) -> Certificate:
  """A certificate of the stochastic classifier from independent (network, example) draws.

  Each of the `draws` evaluations classifies one example z_i by its own network theta ~ Q,
  drawn independently of every other, and every example appears equally often (whole rounds
  over the m examples): the draws are independent Bernoulli variables whose means p_i =
  P_Q(theta errs on z_i) average to E_Q L_S exactly. Hoeffding's (1963, Theorem 1) bound in its
  kl form holds for independent [0, 1] variables with unequal means, so with probability
  >= 1 - delta_mc, E_Q L_S <= kl^-1(errors / draws, ln(2 / delta_mc) / draws) (two-sided, as
  `mc_certificate`), and Langford-Seeger is applied there.

  Args:
    errors: wrong predictions counted; draws: evaluations (rounds * m).
    kl, m, delta, delta_mc: as `mc_certificate`.
  """
  errors, draws = int(errors), _check_m(draws, 'draws')
  if not 0 <= errors <= draws:
    raise ValueError(f'errors must be in [0, draws={draws}], got {errors}')
  delta_mc = _check_delta(delta_mc, 'delta_mc')
  mean = errors / draws
  upper = kl_inverse_upper(mean, math.log(2.0 / delta_mc) / draws)
  return Certificate(
    emp_mean=mean,
    emp_upper=upper,
    samples=draws,
    kl=float(kl),
    bound=langford_seeger(upper, kl, m, delta),
    confidence=1.0 - delta - delta_mc,
  )


def optimal_sigma_ratio(kappa: jax.Array, lam: float) -> jax.Array:
  """u_i = sigma_i^2 / theta_i^2 minimising 0.5 sigma^2 H_ii + lam * 0.5 ln(1 + theta^2/sigma^2)
  (second-order expected loss increase plus lam times the KL with the best per-coordinate
  prior variance sigma^2 + theta^2): the positive root of u^2 + u = lam / kappa_i, for
  kappa_i = theta_i^2 H_ii > 0 (inf where kappa_i <= 0: no curvature, no noise limit)."""
  if not lam > 0:
    raise ValueError(f'lam must be > 0, got {lam}')
  kappa = jnp.asarray(kappa)
  pos = kappa > 0
  r = lam / jnp.where(pos, kappa, 1.0)
  u = 2 * r / (1 + jnp.sqrt(1 + 4 * r))  # (-1 + sqrt(1 + 4r)) / 2 without cancellation
  return jnp.where(pos, u, jnp.inf)


def second_order_objective(kappa: jax.Array, lam: float) -> jax.Array:
  """sum_i min over sigma_i of the objective of `optimal_sigma_ratio`:
  0.5 u_i kappa_i + 0.5 lam ln(1 + 1/u_i), 0 where kappa_i <= 0."""
  kappa = jnp.asarray(kappa)
  u = optimal_sigma_ratio(kappa, lam)
  pos = kappa > 0
  us = jnp.where(pos, u, 1.0)
  val = 0.5 * us * jnp.where(pos, kappa, 0.0) + 0.5 * lam * jnp.log1p(1 / us)
  return jnp.sum(jnp.where(pos, val, 0.0))
