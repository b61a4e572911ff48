"""``torchsven.least_squares``: scipy's nonlinear least-squares interface on tensors.

Minimises ``F(x) = 0.5 * sum_i rho(f_i(x)^2)`` for a residual function
``f: R^n -> R^m`` given as a torch function of a tensor ``x`` of any shape,
dtype and device, with optional box bounds ``lb <= x <= ub``. Argument names,
defaults and meanings follow ``scipy.optimize.least_squares`` (ftol / xtol /
gtol, x_scale, loss and f_scale, bounds, max_nfev, the result fields and the
status codes); see docs/design.md, "Least squares".

Algorithm (one trust-region loop, linear algebra in float64):

* Jacobians by autograd: forward mode (``torch.func.jacfwd``) when ``n <= m``,
  reverse mode otherwise; the other mode where the chosen one cannot run, and a
  loop of ``torch.autograd`` calls when the function cannot be vmapped.
* Robust losses as scipy: with ``z = (f/C)^2``, ``rho_C(f^2) = C^2 rho(z)``,
  the Gauss-Newton model uses ``J_s = w J`` and ``f_s = rho' f / w`` with
  ``w = sqrt(max(rho' + 2 rho'' f^2, eps))`` (``rho''`` of ``rho_C``).
* One SVD ``J D^-1 = U S V^T`` per Jacobian (``D`` the variable scaling); every
  trial step, accepted or retried with a smaller trust region, is
  ``z(mu) = -V diag(s/(s^2+mu)) U^T f`` for the damping ``mu`` that puts
  ``||z|| = ||D h||`` on the trust-region radius (safeguarded Newton on the
  secular equation, as More's ``lmpar``). Its predicted reduction comes from the
  spectral factors, ``sum_i (u_i^T f)^2 phi_i (2 - phi_i) / 2`` with
  ``phi_i = s_i^2 / (s_i^2 + mu)``, never from ``||f||^2 - ||f + J h||^2``.
  A rejected step is retried within the same iteration (same SVD, no new
  Jacobian).
* Without bounds: MINPACK ``lmder``'s radius control and tests (column scaling
  ``x_scale='jac'``: ``D_j = max over iterations of ||J_j||``).
* With bounds (``method='trf'``): the reflective trust region of Coleman and Li
  (Branch, Coleman, Li, SIAM J. Sci. Comput. 21, 1999): Coleman-Li scaling
  ``v``, the augmented model with ``diag(g dv)``, strictly feasible iterates, and
  the best of the truncated, reflected and scaled-gradient steps. Its iterates
  stay strictly inside the box and converge to points satisfying the first-order
  (KKT) conditions under the usual assumptions of that paper.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LOSSES", "METHODS", "LeastSquaresResult", "least_squares", "robust_rho"]

#: Methods: "trf" (default; bounds by the reflective trust region) and "lm" (no bounds).
METHODS = ("trf", "lm")
#: Robust losses, named as in scipy.
LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
#: Jacobian modes for ``jac=``.
JAC_MODES = ("auto", "forward", "reverse")

_EPS = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny

TERMINATION_MESSAGES = {
    -2: "Stopped because `callback` function raised `StopIteration` or returned `True`",
    -1: "Improper input parameters.",
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}


@dataclass
class LeastSquaresResult:
    """What ``least_squares`` returns (the fields of scipy's ``OptimizeResult``).

    Attributes:
        x: the solution, shaped and typed like ``x0``.
        cost: ``0.5 * sum rho(f^2)`` at ``x`` (float).
        fun: residuals ``f(x)``, shaped as ``fun`` returns them.
        jac: (m, n) float64 Jacobian at ``x``; for robust losses the scaled one
            (``J^T J`` is the Gauss-Newton Hessian of the cost), as scipy.
        grad: (n,) float64 gradient of the cost at ``x``.
        optimality: first-order optimality: ``||grad||_inf`` without bounds,
            ``||v * grad||_inf`` (Coleman-Li scaling) with bounds.
        active_mask: (n,) int64: -1 at an active lower bound, 1 upper, 0 free.
        nfev: residual evaluations (the start and every trial).
        njev: Jacobian evaluations.
        status: -2 callback stop, 0 max_nfev, 1 gtol, 2 ftol, 3 xtol, 4 ftol and xtol.
        message: the status in words.
        success: ``status > 0``.
        nit: iterations (accepted or not, one Jacobian each).
    """

    x: Tensor
    cost: float
    fun: Tensor
    jac: Tensor
    grad: Tensor
    optimality: float
    active_mask: Tensor
    nfev: int
    njev: int
    status: int
    message: str
    success: bool
    nit: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [
            "x", "cost", "fun", "jac", "grad", "optimality", "active_mask",
            "nfev", "njev", "status", "message", "success", "nit",
        ]  # fmt: skip


# --------------------------------------------------------------------------- losses
def robust_rho(z: Tensor, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """``rho(z)``, ``rho'(z)``, ``rho''(z)`` of a named loss at ``z >= 0`` (scipy's definitions).

    * linear:  ``z``
    * soft_l1: ``2 (sqrt(1 + z) - 1)``
    * huber:   ``z`` if ``z <= 1`` else ``2 sqrt(z) - 1``
    * cauchy:  ``log(1 + z)``
    * arctan:  ``arctan(z)``
    """
    if loss == "linear":
        return z, torch.ones_like(z), torch.zeros_like(z)
    if loss == "soft_l1":
        t = 1 + z
        return 2 * (t.sqrt() - 1), t.rsqrt(), -0.5 * t.pow(-1.5)
    if loss == "huber":
        inside = z <= 1
        safe = torch.where(inside, torch.ones_like(z), z)
        rho0 = torch.where(inside, z, 2 * safe.sqrt() - 1)
        rho1 = torch.where(inside, torch.ones_like(z), safe.rsqrt())
        rho2 = torch.where(inside, torch.zeros_like(z), -0.5 * safe.pow(-1.5))
        return rho0, rho1, rho2
    if loss == "cauchy":
        t = 1 + z
        return torch.log1p(z), 1 / t, -1 / t.square()
    if loss == "arctan":
        t = 1 + z.square()
        return torch.arctan(z), 1 / t, -2 * z / t.square()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _loss_cost(f: Tensor, loss: str, f_scale: float) -> float:
    """``0.5 * sum C^2 rho((f/C)^2)`` (``0.5 ||f||^2`` for the linear loss)."""
    if loss == "linear":
        return 0.5 * float(f.dot(f))
    rho0, _, _ = robust_rho((f / f_scale).square(), loss)
    return 0.5 * f_scale**2 * float(rho0.sum())


def _scale_for_loss(f: Tensor, jac: Tensor, loss: str, f_scale: float) -> tuple[Tensor, Tensor]:
    """scipy's Gauss-Newton model of a robust loss: ``(f_s, J_s)`` with ``J_s^T f_s`` = grad.

    With ``rho_C(s) = C^2 rho(s / C^2)``: ``rho_C' = rho'(z)``, ``rho_C'' = rho''(z) / C^2``,
    weight ``w = sqrt(max(rho_C' + 2 rho_C'' f^2, eps))``, ``f_s = rho_C' f / w``,
    ``J_s = w J``.
    """
    if loss == "linear":
        return f, jac
    _, rho1, rho2 = robust_rho((f / f_scale).square(), loss)
    rho2 = rho2 / f_scale**2
    weight = torch.clamp(rho1 + 2 * rho2 * f.square(), min=_EPS).sqrt()
    return rho1 * f / weight, weight[:, None] * jac


# ----------------------------------------------------------------------- Jacobians
class _Problem:
    """The user's function on flat float64 vectors, counting evaluations."""

    def __init__(
        self,
        fun: Callable[..., Tensor],
        jac: Any,
        x0: Tensor,
        args: tuple,
        kwargs: dict,
    ) -> None:
        self.fun, self.jac_option, self.args, self.kwargs = fun, jac, args, kwargs
        self.shape, self.dtype, self.device = x0.shape, x0.dtype, x0.device
        self.out_shape: torch.Size | None = None
        self.m = 0
        self.nfev = 0
        self.njev = 0
        self.failed_modes: set[str] = set()

    def as_user(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).reshape(self.shape)

    def _flat(self, x_user: Tensor) -> Tensor:
        out = self.fun(x_user, *self.args, **self.kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(f"fun must return a tensor, got {type(out).__name__}")
        return out.reshape(-1)

    def residuals(self, x: Tensor) -> Tensor:
        """f(x) (m,) float64; the first call fixes the output shape."""
        with torch.no_grad():
            out = self.fun(self.as_user(x), *self.args, **self.kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(f"fun must return a tensor, got {type(out).__name__}")
        if not (out.is_floating_point()):
            raise TypeError(f"fun must return a floating-point tensor, got {out.dtype}")
        if self.out_shape is None:
            if out.numel() == 0:
                raise ValueError("fun returned no residuals (an empty tensor)")
            self.out_shape, self.m = out.shape, out.numel()
        elif out.shape != self.out_shape:
            raise ValueError(
                f"fun returned shape {tuple(out.shape)} at a trial point, but "
                f"{tuple(self.out_shape)} at x0: the residual shape must not change"
            )
        self.nfev += 1
        return out.detach().reshape(-1).to(torch.float64)

    def jacobian(self, x: Tensor, n: int) -> Tensor:
        """J (m, n) float64 at x by autograd (or the user's ``jac``)."""
        self.njev += 1
        x_user = self.as_user(x).detach()
        option = self.jac_option
        if callable(option):
            out = option(x_user, *self.args, **self.kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"jac must return a tensor, got {type(out).__name__}")
            if out.numel() != self.m * n:
                raise ValueError(
                    f"jac returned shape {tuple(out.shape)}; expected {self.m * n} "
                    f"numbers (m={self.m} residuals x n={n} variables)"
                )
            return out.detach().reshape(self.m, n).to(torch.float64)
        mode = option
        if mode == "auto":
            mode = "forward" if n <= self.m else "reverse"
        flat_in = x_user.reshape(-1)

        def flat_fun(v: Tensor) -> Tensor:
            return self._flat(v.reshape(self.shape))

        jac = None
        # The chosen mode first; where it cannot run (no forward-mode formula, an
        # op vmap refuses), the other mode, then a loop of reverse-mode calls.
        order = (mode, "reverse" if mode == "forward" else "forward")
        for attempt in order if self.jac_option == "auto" else (mode,):
            if attempt in self.failed_modes:
                continue
            try:
                with torch.enable_grad():
                    if attempt == "forward":
                        jac = torch.func.jacfwd(flat_fun)(flat_in)
                    else:
                        jac = torch.func.jacrev(flat_fun)(flat_in)
                break
            except (RuntimeError, NotImplementedError, TypeError):
                self.failed_modes.add(attempt)
        if jac is None:
            with torch.enable_grad():
                jac = torch.autograd.functional.jacobian(
                    flat_fun, flat_in, vectorize=False, strategy="reverse-mode"
                )
        if jac.numel() != self.m * n:
            raise ValueError(
                f"fun returned {jac.numel() // n} residuals while differentiated, "
                f"{self.m} at x0: the residual shape must not change"
            )
        return jac.detach().reshape(self.m, n).to(torch.float64)


# -------------------------------------------------------------- trust-region solve
@dataclass
class _Spectral:
    """SVD of the scaled Jacobian ``A = U diag(s) V^T`` and ``c = U^T f``."""

    s: Tensor
    v: Tensor
    c: Tensor
    rank_cut: float

    @classmethod
    def of(cls, a: Tensor, f: Tensor) -> _Spectral:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        cut = float(s[0]) * _EPS * max(a.shape) if s.numel() else 0.0
        return cls(s, vh.mT, u.mT @ f, cut)

    def filters(self, mu: float) -> Tensor:
        """``phi_i = s_i^2 / (s_i^2 + mu)`` (1 on kept directions at mu = 0, 0 on dropped)."""
        e = self.s.square()
        if mu > 0:
            return e / (e + mu)
        return (self.s > self.rank_cut).to(e.dtype)

    def step(self, mu: float) -> Tensor:
        """``z(mu) = -V diag(phi_i / s_i) c`` (n,)."""
        phi = self.filters(mu)
        safe = torch.where(phi > 0, self.s, torch.ones_like(self.s))
        return -(self.v @ (phi / safe * self.c))

    def predicted(self, mu: float) -> tuple[float, float, float]:
        """Predicted reduction, ``||A z||^2`` and ``mu ||z||^2`` from the spectral factors.

        ``0.5 (||f||^2 - ||f + A z||^2) = 0.5 sum c_i^2 phi_i (2 - phi_i)``.
        """
        phi = self.filters(mu)
        c2 = self.c.square()
        model = float((c2 * phi * (2 - phi)).sum()) * 0.5
        fitted = float((c2 * phi.square()).sum())
        rest = mu / (self.s.square() + mu) if mu > 0 else torch.zeros_like(phi)  # 1 - phi
        damped = float((c2 * phi * rest).sum())
        return model, fitted, damped

    def norm(self, mu: float) -> float:
        phi = self.filters(mu)
        safe = torch.where(phi > 0, self.s, torch.ones_like(self.s))
        return float((phi / safe * self.c).norm())

    def solve_radius(self, radius: float, mu_start: float = 0.0) -> float:
        """Damping ``mu >= 0`` with ``||z(mu)||`` within 10% of ``radius`` (More's lmpar).

        ``mu = 0`` (the Gauss-Newton step, pseudo-inverse on the numerical rank)
        when it is short enough. Otherwise safeguarded Newton steps on
        ``1/radius - 1/||z(mu)||`` (concave and increasing in mu, so Newton from
        below stays below the root), starting from ``mu_start`` clipped into the
        bracket ``[lower, upper]``: ``lower`` the Newton step from 0 (full rank),
        ``upper = ||A^T f|| / radius``. At most 10 iterations, as MINPACK.
        """
        gn = self.norm(0.0)
        phi0 = gn - radius
        if phi0 <= 0.1 * radius:
            return 0.0
        e = self.s.square()
        c2 = self.c.square()
        lower = 0.0
        if bool((self.s > self.rank_cut).all()):
            d = float((c2 / e.square()).sum())  # sum c_i^2 / s_i^4 = -0.5 d||z||^2/dmu at 0
            if d > 0 and math.isfinite(d):
                lower = phi0 / radius * gn * gn / d
        grad_norm = float((self.s * self.c).norm())
        upper = grad_norm / radius
        if upper == 0:
            upper = _TINY / min(radius, 0.1)
        mu = min(max(mu_start, lower), upper)
        if mu == 0:
            mu = grad_norm / gn
        for iteration in range(1, 11):
            if mu == 0:
                mu = max(_TINY, 1e-3 * upper)
            denom = e + mu
            z2 = float((e * c2 / denom.square()).sum())
            znorm = math.sqrt(z2)
            previous = phi0
            phi0 = znorm - radius
            if (
                abs(phi0) <= 0.1 * radius
                or (lower == 0 and phi0 <= previous and previous < 0)
                or iteration == 10
            ):
                break
            deriv = float((e * c2 / denom.pow(3)).sum())  # -0.5 d||z||^2/dmu
            correction = phi0 / radius * z2 / deriv if deriv > 0 else 0.0
            if phi0 > 0:
                lower = max(lower, mu)
            if phi0 < 0:
                upper = min(upper, mu)
            mu = max(lower, mu + correction)
        return mu


# ------------------------------------------------------------------ bound helpers
def _step_to_bound(x: Tensor, s: Tensor, lb: Tensor, ub: Tensor) -> tuple[float, Tensor]:
    """Largest t with ``lb <= x + t s <= ub`` and the sign of the hit per coordinate."""
    nonzero = s != 0
    safe = torch.where(nonzero, s, torch.ones_like(s))
    t = torch.maximum((lb - x) / safe, (ub - x) / safe)
    t = torch.where(nonzero, t, torch.full_like(t, math.inf))
    t_min = float(t.min())
    hits = (t == t_min).to(s.dtype) * torch.sign(s)
    return t_min, hits


def _intersect_ball(p: Tensor, s: Tensor, radius: float) -> tuple[float, float]:
    """The two t with ``||p + t s|| = radius`` (``||p|| < radius``), smaller first."""
    a = float(s.dot(s))
    if a == 0:
        return -math.inf, math.inf
    b = float(p.dot(s))
    c = float(p.dot(p)) - radius**2
    disc = math.sqrt(max(b * b - a * c, 0.0))
    q = -(b + math.copysign(disc, b))
    t1, t2 = q / a, (c / q if q != 0 else 0.0)
    return min(t1, t2), max(t1, t2)


def _quadratic_1d(
    jac: Tensor, g: Tensor, diag: Tensor, s: Tensor, s0: Tensor | None = None
) -> tuple[float, float, float]:
    """Coefficients (a, b, c) of ``q(s0 + t s) = a t^2 + b t + c`` for the model
    ``q(p) = 0.5 ||J p||^2 + g^T p + 0.5 p^T diag(d) p``."""
    js = jac @ s
    a = 0.5 * (float(js.dot(js)) + float((s * diag * s).sum()))
    b = float(g.dot(s))
    c = 0.0
    if s0 is not None:
        js0 = jac @ s0
        b += float(js.dot(js0)) + float((s * diag * s0).sum())
        c = 0.5 * (float(js0.dot(js0)) + float((s0 * diag * s0).sum())) + float(g.dot(s0))
    return a, b, c


def _minimize_1d(a: float, b: float, c: float, lo: float, hi: float) -> tuple[float, float]:
    """argmin and min of ``a t^2 + b t + c`` on [lo, hi]."""
    candidates = [lo, hi]
    if a != 0:
        t = -0.5 * b / a
        if lo < t < hi:
            candidates.append(t)
    values = [a * t * t + b * t + c for t in candidates]
    best = min(range(len(values)), key=values.__getitem__)
    return candidates[best], values[best]


def _strictly_feasible(x: Tensor, lb: Tensor, ub: Tensor, rstep: float) -> Tensor:
    """Move points on (or beyond) a bound inside by ``rstep`` relative (next float if 0)."""
    x = x.clone()
    active = _active_mask(x, lb, ub, rstep)
    lower, upper = active == -1, active == 1
    if rstep == 0:
        x = torch.where(lower, torch.nextafter(lb, ub), x)
        x = torch.where(upper, torch.nextafter(ub, lb), x)
    else:
        x = torch.where(lower, lb + rstep * torch.clamp(lb.abs(), min=1.0), x)
        x = torch.where(upper, ub - rstep * torch.clamp(ub.abs(), min=1.0), x)
    tight = (x < lb) | (x > ub)
    return torch.where(tight, 0.5 * (lb + ub), x)


def _active_mask(x: Tensor, lb: Tensor, ub: Tensor, rtol: float) -> Tensor:
    """-1 where x is within ``rtol max(1, |lb|)`` of lb (and nearer it than ub), 1 for ub."""
    active = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    if rtol == 0:
        active[x <= lb] = -1
        active[x >= ub] = 1
        return active
    to_lower, to_upper = x - lb, ub - x
    lower = torch.isfinite(lb) & (
        to_lower <= torch.minimum(to_upper, rtol * torch.clamp(lb.abs(), min=1.0))
    )
    upper = torch.isfinite(ub) & (
        to_upper <= torch.minimum(to_lower, rtol * torch.clamp(ub.abs(), min=1.0))
    )
    active[lower] = -1
    active[upper] = 1
    return active


def _coleman_li(x: Tensor, g: Tensor, lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    """Coleman-Li scaling ``v`` (distance to the bound the gradient pushes toward, else 1)
    and its derivative ``dv`` (1, -1 or 0)."""
    v = torch.ones_like(x)
    dv = torch.zeros_like(x)
    to_upper = (g < 0) & torch.isfinite(ub)
    to_lower = (g > 0) & torch.isfinite(lb)
    v = torch.where(to_upper, ub - x, v)
    dv = torch.where(to_upper, -torch.ones_like(x), dv)
    v = torch.where(to_lower, x - lb, v)
    dv = torch.where(to_lower, torch.ones_like(x), dv)
    return v, dv


# ----------------------------------------------------------------------- checks
def _check_tolerance(value: Any, name: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _as_bound(value: Any, name: str, x0: Tensor) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64, device=x0.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"bounds {name} must be a number or tensor, got {value!r}") from err
    if t.dim() == 0:
        return t.expand(x0.numel()).clone()
    if t.shape != x0.shape and not (t.numel() == x0.numel() and t.dim() == 1 and x0.dim() <= 1):
        raise ValueError(
            f"bounds {name} has shape {tuple(t.shape)}; it must be a scalar or have "
            f"x0's shape {tuple(x0.shape)}"
        )
    if torch.isnan(t).any():
        raise ValueError(f"bounds {name} contains NaN")
    return t.reshape(-1).clone()


def _check_x_scale(x_scale: Any, x0: Tensor, method: str) -> Tensor | str:
    if x_scale is None:
        return "jac"
    if isinstance(x_scale, str):
        if x_scale != "jac":
            raise ValueError(f"x_scale must be 'jac' or positive numbers, got {x_scale!r}")
        return "jac"
    try:
        t = torch.as_tensor(x_scale, dtype=torch.float64, device=x0.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"x_scale must be 'jac' or positive numbers, got {x_scale!r}") from err
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError("x_scale must be 'jac' or finite positive numbers")
    if t.dim() == 0:
        return t.expand(x0.numel()).clone()
    if t.numel() != x0.numel() or (t.shape != x0.shape and t.dim() != 1):
        raise ValueError(
            f"x_scale has shape {tuple(t.shape)}; it must be a scalar or have x0's shape "
            f"{tuple(x0.shape)}"
        )
    return t.reshape(-1).clone()


class _Progress:
    """verbose=1: one self-overwriting status line on a terminal (nothing otherwise);
    verbose=2: one printed line per iteration (scipy's table)."""

    def __init__(self, verbose: int) -> None:
        self.verbose = verbose
        self.live = verbose == 1 and sys.stderr.isatty()
        self.last = 0.0
        if verbose == 2:
            print(
                f"{'Iteration':>10} {'Total nfev':>12} {'Cost':>13} {'Cost reduction':>15} "
                f"{'Step norm':>11} {'Optimality':>11}"
            )

    def update(self, it: int, nfev: int, cost: float, reduction: float | None,
               step: float | None, optimality: float) -> None:  # fmt: skip
        if self.verbose == 2:
            red = "" if reduction is None else f"{reduction:.2e}"
            st = "" if step is None else f"{step:.2e}"
            print(f"{it:>10} {nfev:>12} {cost:>13.4e} {red:>15} {st:>11} {optimality:>11.2e}")
        elif self.live and time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            sys.stderr.write(
                f"\rleast_squares: iter {it} nfev {nfev} cost {cost:.6e} opt {optimality:.2e} "
            )
            sys.stderr.flush()

    def close(self, result: LeastSquaresResult, initial_cost: float) -> None:
        if self.live:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()
        if self.verbose >= 1:
            print(result.message)
            print(
                f"Function evaluations {result.nfev}, initial cost {initial_cost:.4e}, "
                f"final cost {result.cost:.4e}, first-order optimality {result.optimality:.2e}."
            )


def _wrap_callback(callback: Callable | None) -> Callable[[dict], bool] | None:
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    try:
        wants_result = "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):
        wants_result = False

    def call(state: dict) -> bool:
        try:
            out = callback(intermediate_result=state) if wants_result else callback(state["x"])
        except StopIteration:
            return True
        return bool(out is True)

    return call


# -------------------------------------------------------------------- main entry
def least_squares(
    fun: Callable[..., Tensor],
    x0: Tensor,
    jac: str | Callable[..., Tensor] = "auto",
    bounds: tuple[Any, Any] = (-math.inf, math.inf),
    method: str = "trf",
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    x_scale: Any = None,
    loss: str = "linear",
    f_scale: float = 1.0,
    max_nfev: int | None = None,
    verbose: int = 0,
    args: tuple = (),
    kwargs: dict | None = None,
    callback: Callable | None = None,
) -> LeastSquaresResult:
    """Solve ``min_x 0.5 sum_i rho(f_i(x)^2)`` subject to ``lb <= x <= ub``.

    Mirrors ``scipy.optimize.least_squares`` on torch tensors.

    Args:
        fun: ``fun(x, *args, **kwargs)`` -> residual tensor of any shape (m numbers),
            differentiable by autograd (unless ``jac`` is a callable).
        x0: start, a floating tensor of any shape, dtype and device (copied, not changed).
        jac: "auto" (forward-mode autograd when ``n <= m``, reverse otherwise),
            "forward", "reverse", or ``jac(x, *args, **kwargs)`` -> (m, n) tensor.
        bounds: ``(lb, ub)``, each a scalar or a tensor shaped like ``x0``; ``+-inf`` for none.
        method: "trf" (default: trust region; reflective Coleman-Li steps with bounds)
            or "lm" (trust-region Levenberg-Marquardt as MINPACK; no bounds).
            Without bounds both run the same MINPACK-style loop.
        ftol: stop when the actual and predicted relative cost reductions are
            both ``<= ftol`` (and the ratio of them ``<= 2``).
        xtol: stop when the trust region (scaled step) is ``<= xtol`` relative to ``||D x||``
            (with bounds: ``||dx|| < xtol (xtol + ||x||)``, scipy's trf test).
        gtol: stop when the largest cosine between f and a column of J is ``<= gtol``
            (MINPACK's test; with bounds: ``||v * g||_inf < gtol``, scipy's trf test).
        x_scale: "jac" (default, MINPACK's column scaling ``D_j = max_k ||J_j||``
            over the iterations so far) or positive numbers (``D = 1/x_scale``).
            Unlike scipy's trf (default 1.0), "jac" is the default for both methods.
        loss: "linear", "soft_l1", "huber", "cauchy" or "arctan" (scipy's rho).
        f_scale: soft margin ``C`` between inliers and outliers: ``rho_C(f^2) = C^2 rho(f^2/C^2)``.
        max_nfev: most residual evaluations (default ``100 * n``).
        verbose: 0 silent; 1 final message and, on a terminal only, a live status line;
            2 one line per iteration.
        args, kwargs: passed on to ``fun`` (and ``jac``).
        callback: ``callback(intermediate_result)`` (a dict with x, fun, cost, nit, nfev)
            or ``callback(x)``; returning True or raising StopIteration stops (status -2).

    Returns:
        A :class:`LeastSquaresResult` with scipy's fields.

    Raises:
        TypeError / ValueError naming the argument on bad input (see the README).
    """
    # ---------------------------------------------------------------- validate
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")
    if not isinstance(x0, Tensor):
        if isinstance(x0, (int, float, list, tuple)):
            x0 = torch.as_tensor(x0, dtype=torch.float64)
        else:
            raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    if x0.numel() == 0:
        raise ValueError("x0 has no elements")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 must be finite")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(f_scale, bool) or not isinstance(f_scale, (int, float)):
        raise TypeError(f"f_scale must be a real number, got {type(f_scale).__name__}")
    if not math.isfinite(f_scale) or f_scale <= 0:
        raise ValueError(f"f_scale must be a finite number > 0, got {f_scale!r}")
    ftol = _check_tolerance(ftol, "ftol")
    xtol = _check_tolerance(xtol, "xtol")
    gtol = _check_tolerance(gtol, "gtol")
    if ftol < _EPS and xtol < _EPS and gtol < _EPS:
        raise ValueError(
            f"at least one of ftol, xtol, gtol must be >= machine epsilon ({_EPS:.2e})"
        )
    if max_nfev is not None:
        if isinstance(max_nfev, bool) or not isinstance(max_nfev, int):
            raise TypeError(f"max_nfev must be None or an int, got {type(max_nfev).__name__}")
        if max_nfev <= 0:
            raise ValueError(f"max_nfev must be None or a positive int, got {max_nfev!r}")
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not callable(jac) and jac not in JAC_MODES:
        raise ValueError(f"jac must be one of {JAC_MODES} (autograd) or a callable, got {jac!r}")
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError("bounds must be a pair (lb, ub)")
    lb = _as_bound(bounds[0], "lb", x0)
    ub = _as_bound(bounds[1], "ub", x0)
    if bool((lb >= ub).any()):
        raise ValueError("bounds: each lower bound must be strictly less than its upper bound")
    bounded = bool(torch.isfinite(lb).any() or torch.isfinite(ub).any())
    if method == "lm" and bounded:
        raise ValueError("method='lm' does not support bounds; use method='trf'")
    x_flat = x0.detach().reshape(-1).to(torch.float64)
    if bool(((x_flat < lb) | (x_flat > ub)).any()):
        raise ValueError("x0 is outside the bounds")
    scale_option = _check_x_scale(x_scale, x0, method)
    call_back = _wrap_callback(callback)

    problem = _Problem(fun, jac, x0.detach(), args, kwargs or {})
    n = x_flat.numel()
    if bounded:
        x_flat = _strictly_feasible(x_flat, lb, ub, 1e-10)
    f0 = problem.residuals(x_flat)
    if not bool(torch.isfinite(f0).all()):
        raise ValueError("fun: residuals are not finite at x0")
    if not math.isfinite(_loss_cost(f0, loss, f_scale)):
        raise ValueError("fun: the cost 0.5 * sum f^2 overflows at x0 (residuals too large)")
    if max_nfev is None:
        max_nfev = 100 * n
    engine = _bounded_trf if bounded else _minpack_lm
    return engine(
        problem, x_flat, f0, lb, ub, ftol, xtol, gtol, scale_option, loss,
        float(f_scale), max_nfev, _Progress(verbose), call_back,
    )  # fmt: skip


# -------------------------------------------------------------- shared pieces
def _evaluate_jacobian(
    problem: _Problem, x: Tensor, f_true: Tensor, loss: str, f_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(f_s, J_s, J) at x: the loss-scaled residual and Jacobian, and the raw Jacobian."""
    jac = problem.jacobian(x, x.numel())
    if not bool(torch.isfinite(jac).all()):
        raise ValueError("fun: the Jacobian is not finite at an iterate (non-differentiable?)")
    f_s, j_s = _scale_for_loss(f_true, jac, loss, f_scale)
    return f_s, j_s, jac


def _column_norms(jac: Tensor) -> Tensor:
    return jac.square().sum(dim=0).sqrt()


def _finish(
    problem: _Problem, x: Tensor, f_true: Tensor, j_s: Tensor, g: Tensor, cost: float,
    optimality: float, active: Tensor, status: int, nit: int, extras: dict[str, Any],
) -> LeastSquaresResult:  # fmt: skip
    assert problem.out_shape is not None
    return LeastSquaresResult(
        x=problem.as_user(x).clone(),
        cost=cost,
        fun=f_true.to(problem.dtype).reshape(problem.out_shape),
        jac=j_s,
        grad=g,
        optimality=optimality,
        active_mask=active,
        nfev=problem.nfev,
        njev=problem.njev,
        status=status,
        message=TERMINATION_MESSAGES[status],
        success=status > 0,
        nit=nit,
        extras=extras,
    )


def _state(x: Tensor, problem: _Problem, f_true: Tensor, cost: float, nit: int) -> dict:
    assert problem.out_shape is not None
    return {
        "x": problem.as_user(x),
        "fun": f_true.to(problem.dtype).reshape(problem.out_shape),
        "cost": cost,
        "nit": nit,
        "nfev": problem.nfev,
    }


# ------------------------------------------------------------- MINPACK-style LM
def _tolerance_status(ftol_hit: bool, xtol_hit: bool) -> int | None:
    """scipy's status for the tolerance tests that fired: 4 both, 2 ftol, 3 xtol, else None."""
    if ftol_hit and xtol_hit:
        return 4
    if ftol_hit:
        return 2
    if xtol_hit:
        return 3
    return None


def _minpack_lm(
    problem: _Problem, x: Tensor, f_true: Tensor, lb: Tensor, ub: Tensor,
    ftol: float, xtol: float, gtol: float, scale_option: Tensor | str, loss: str,
    f_scale: float, max_nfev: int, progress: _Progress, call_back: Callable | None,
) -> LeastSquaresResult:  # fmt: skip
    """Unbounded trust-region Levenberg-Marquardt with MINPACK lmder's control.

    Per iteration: J, the scaling D, the SVD of ``J D^-1``; then trials
    ``h = D^-1 z(mu)`` with ``||z|| ~ Delta`` until one has gain ratio >= 1e-4.
    Radius update (More 1978): ratio <= 1/4 shrinks Delta by a factor in
    [0.1, 0.5] from a quadratic fit; ratio >= 3/4 (or a Gauss-Newton step) sets
    Delta = 2 ||D h||.
    """
    jac_scaled = isinstance(scale_option, str)
    cost = _loss_cost(f_true, loss, f_scale)
    initial_cost = cost
    # MINPACK's first radius is 100 ||D x0||; a robust loss is not convex, so it
    # starts from ||D x0|| (scipy trf's choice) to stay near the start's basin.
    factor = 100.0 if loss == "linear" else 1.0
    diag: Tensor | None = None if jac_scaled else 1.0 / scale_option  # type: ignore[operator]
    delta = 0.0
    mu = 0.0
    nit = 0
    status: int | None = None
    rejected_total = 0
    f_s, j_s, _ = _evaluate_jacobian(problem, x, f_true, loss, f_scale)
    g = j_s.mT @ f_s
    reduction: float | None = None
    step_norm: float | None = None
    while True:
        col = _column_norms(j_s)
        if jac_scaled:
            if diag is None:
                diag = torch.where(col > 0, col, torch.ones_like(col))
            else:
                diag = torch.maximum(diag, col)
        assert diag is not None
        if nit == 0:
            xnorm = float((diag * x).norm())
            delta = factor * xnorm if xnorm > 0 else factor
        optimality = float(g.abs().max())
        progress.update(nit, problem.nfev, cost, reduction, step_norm, optimality)
        # gtol: largest cosine between f and a column of J (MINPACK); for a robust
        # loss |g_j| / (||J_s,j|| sqrt(2 cost)), the same for the linear loss.
        fnorm = math.sqrt(2 * cost) if cost > 0 else 0.0
        if fnorm == 0:
            status = 1
        else:
            nz = col > 0
            cosines = g[nz].abs() / (col[nz] * fnorm) if bool(nz.any()) else g[:0]
            if cosines.numel() == 0 or float(cosines.max()) <= gtol:
                status = 1
        if status is not None:
            break
        spectral = _Spectral.of(j_s / diag, f_s)
        while True:
            mu = spectral.solve_radius(delta, mu)
            z = spectral.step(mu)
            h = z / diag
            pnorm = float(z.norm())
            if nit == 0:
                delta = min(delta, pnorm)
            x_new = x + h
            f_new = problem.residuals(x_new)
            predicted, fitted, damped = spectral.predicted(mu)
            cost_new = (
                _loss_cost(f_new, loss, f_scale) if bool(torch.isfinite(f_new).all()) else math.inf
            )
            actual = cost - cost_new if cost_new < 100 * cost else -cost
            rel_actual = actual / cost
            rel_predicted = predicted / cost
            ratio = rel_actual / rel_predicted if rel_predicted > 0 else 0.0
            if ratio <= 0.25:
                if actual >= 0:
                    shrink = 0.5
                else:
                    dirder = -(fitted + damped) / (2 * cost)
                    shrink = 0.5 * dirder / (dirder + 0.5 * rel_actual)
                if not cost_new < 100 * cost or not shrink >= 0.1:
                    shrink = 0.1
                delta = shrink * min(delta, pnorm / 0.1)
                mu = mu / shrink
            elif mu == 0 or ratio >= 0.75:
                delta = pnorm / 0.5
                mu = 0.5 * mu
            accepted = ratio >= 1e-4
            if accepted:
                x, f_true, cost = x_new, f_new, cost_new
                reduction, step_norm = actual, float(h.norm())
            else:
                rejected_total += 1
            xnorm = float((diag * x).norm())
            ftol_hit = abs(rel_actual) <= ftol and rel_predicted <= ftol and 0.5 * ratio <= 1
            xtol_hit = delta <= xtol * xnorm
            status = _tolerance_status(ftol_hit, xtol_hit)
            if status is None and problem.nfev >= max_nfev:
                status = 0
            if accepted or status is not None:
                break
        nit += 1
        if accepted:
            f_s, j_s, _ = _evaluate_jacobian(problem, x, f_true, loss, f_scale)
            g = j_s.mT @ f_s
        if call_back is not None and call_back(_state(x, problem, f_true, cost, nit)):
            status = -2
        if status is not None:
            break
    optimality = float(g.abs().max())
    result = _finish(
        problem, x, f_true, j_s, g, cost, optimality,
        torch.zeros(x.numel(), dtype=torch.int64, device=x.device), status, nit,
        {"rejected": rejected_total, "method": "lm"},
    )  # fmt: skip
    progress.close(result, initial_cost)
    return result


# --------------------------------------------------- reflective trust region (bounds)
def _bounded_trf(
    problem: _Problem, x: Tensor, f_true: Tensor, lb: Tensor, ub: Tensor,
    ftol: float, xtol: float, gtol: float, scale_option: Tensor | str, loss: str,
    f_scale: float, max_nfev: int, progress: _Progress, call_back: Callable | None,
) -> LeastSquaresResult:  # fmt: skip
    """Trust-region reflective method for box bounds (Coleman-Li scaling).

    In the variables ``x = x_k + d * p_h`` with ``d = sqrt(v) / D`` the model is
    ``0.5 ||J_h p_h + f||^2 + 0.5 p_h^T diag(g dv / D) p_h`` (``J_h = J diag(d)``)
    on ``||p_h|| <= Delta``; it is solved through the SVD of the augmented matrix
    ``[J_h; diag(sqrt(g dv / D))]``. The step is the best (by the model) of:
    the trust-region step stepped back to stay strictly feasible, its
    reflection at the first bound it crosses, and the scaled steepest descent.
    """
    jac_scaled = isinstance(scale_option, str)
    cost = _loss_cost(f_true, loss, f_scale)
    initial_cost = cost
    f_s, j_s, _ = _evaluate_jacobian(problem, x, f_true, loss, f_scale)
    g = j_s.mT @ f_s
    if jac_scaled:
        col = _column_norms(j_s)
        scale_inv = torch.where(col > 0, col, torch.ones_like(col))
    else:
        scale_inv = 1.0 / scale_option  # type: ignore[operator]
    v, dv = _coleman_li(x, g, lb, ub)
    v = torch.where(dv != 0, v * scale_inv, v)
    delta = float((x * scale_inv / v.sqrt()).norm())
    if delta == 0:
        delta = 1.0
    n = j_s.shape[1]
    mu = 0.0
    nit = 0
    status: int | None = None
    reduction: float | None = None
    step_norm: float | None = None
    rejected_total = 0
    while True:
        v, dv = _coleman_li(x, g, lb, ub)
        g_norm = float((g * v).abs().max())
        progress.update(nit, problem.nfev, cost, reduction, step_norm, g_norm)
        if g_norm < gtol:
            status = 1
        if status is not None or problem.nfev >= max_nfev:
            break
        v = torch.where(dv != 0, v * scale_inv, v)
        d = v.sqrt() / scale_inv
        diag_h = g * dv / scale_inv
        g_h = d * g
        j_h = j_s * d
        augmented = torch.cat([j_h, torch.diag(diag_h.sqrt())])
        f_aug = torch.cat([f_s, torch.zeros(n, dtype=f_s.dtype, device=f_s.device)])
        spectral = _Spectral.of(augmented, f_aug)
        theta = max(0.995, 1 - g_norm)
        actual = -1.0
        while actual <= 0 and problem.nfev < max_nfev:
            mu = spectral.solve_radius(delta, mu)
            p_h = spectral.step(mu)
            p = d * p_h
            step, step_h, predicted = _select_step(
                x, j_h, diag_h, g_h, p, p_h, d, delta, lb, ub, theta, spectral, mu
            )
            x_new = _strictly_feasible(x + step, lb, ub, 0.0)
            f_new = problem.residuals(x_new)
            step_h_norm = float(step_h.norm())
            if not bool(torch.isfinite(f_new).all()):
                delta = 0.25 * step_h_norm
                rejected_total += 1
                continue
            cost_new = _loss_cost(f_new, loss, f_scale)
            actual = cost - cost_new
            if predicted > 0:
                ratio = actual / predicted
            elif predicted == actual == 0:
                ratio = 1.0
            else:
                ratio = 0.0
            new_delta = delta
            if ratio < 0.25:
                new_delta = 0.25 * step_h_norm
            elif ratio > 0.75 and step_h_norm > 0.95 * delta:
                new_delta = 2.0 * delta
            step_norm = float(step.norm())
            ftol_hit = actual < ftol * cost and ratio > 0.25
            xtol_hit = step_norm < xtol * (xtol + float(x.norm()))
            status = _tolerance_status(ftol_hit, xtol_hit)
            if status is not None:
                break
            if actual <= 0:
                rejected_total += 1
            if new_delta > 0:
                mu *= delta / new_delta
            delta = new_delta
        if actual > 0:
            x, f_true, cost = x_new, f_new, cost_new
            reduction = actual
            f_s, j_s, _ = _evaluate_jacobian(problem, x, f_true, loss, f_scale)
            g = j_s.mT @ f_s
            if jac_scaled:
                scale_inv = torch.maximum(scale_inv, _column_norms(j_s))
        else:
            step_norm, reduction = 0.0, 0.0
        nit += 1
        if call_back is not None and call_back(_state(x, problem, f_true, cost, nit)):
            status = -2
            break
    if status is None:
        status = 0
    v, _ = _coleman_li(x, g, lb, ub)
    result = _finish(
        problem, x, f_true, j_s, g, cost, float((g * v).abs().max()),
        _active_mask(x, lb, ub, xtol), status, nit,
        {"rejected": rejected_total, "method": "trf"},
    )  # fmt: skip
    progress.close(result, initial_cost)
    return result


def _select_step(
    x: Tensor, j_h: Tensor, diag_h: Tensor, g_h: Tensor, p: Tensor, p_h: Tensor, d: Tensor,
    delta: float, lb: Tensor, ub: Tensor, theta: float, spectral: _Spectral, mu: float,
) -> tuple[Tensor, Tensor, float]:  # fmt: skip
    """Best of the interior trust-region step, its reflection, and scaled descent.

    Returns (step in x, step in hat variables, predicted reduction). The
    unrestricted trust-region step's prediction comes from the spectral factors.
    """
    if bool(((x + p >= lb) & (x + p <= ub)).all()):
        return p, p_h, spectral.predicted(mu)[0]
    stride, hits = _step_to_bound(x, p, lb, ub)
    r_h = torch.where(hits != 0, -p_h, p_h)
    r = d * r_h
    p = p * stride
    p_h = p_h * stride
    x_on_bound = x + p
    _, to_region = _intersect_ball(p_h, r_h, delta)
    to_bound, _ = _step_to_bound(x_on_bound, r, lb, ub)
    r_stride = min(to_bound, to_region)
    if r_stride > 0:
        r_lo = (1 - theta) * stride / r_stride
        r_hi = theta * to_bound if r_stride == to_bound else to_region
    else:
        r_lo, r_hi = 0.0, -1.0
    r_value = math.inf
    if r_lo <= r_hi:
        a, b, c = _quadratic_1d(j_h, g_h, diag_h, r_h, p_h)
        t, r_value = _minimize_1d(a, b, c, r_lo, r_hi)
        r_h = p_h + t * r_h
        r = d * r_h
    p = p * theta
    p_h = p_h * theta
    a, b, c = _quadratic_1d(j_h, g_h, diag_h, p_h)
    p_value = a + b + c
    ag_h = -g_h
    ag = d * ag_h
    to_region_g = delta / float(ag_h.norm()) if float(ag_h.norm()) > 0 else math.inf
    to_bound_g, _ = _step_to_bound(x, ag, lb, ub)
    ag_stride = theta * to_bound_g if to_bound_g < to_region_g else to_region_g
    a, b, c = _quadratic_1d(j_h, g_h, diag_h, ag_h)
    t, ag_value = _minimize_1d(a, b, c, 0.0, ag_stride)
    ag_h = ag_h * t
    ag = ag * t
    if p_value < r_value and p_value < ag_value:
        return p, p_h, -p_value
    if r_value < p_value and r_value < ag_value:
        return r, r_h, -r_value
    return ag, ag_h, -ag_value
