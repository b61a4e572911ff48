"""The Moré-Garbow-Hillstrom nonlinear least-squares test set, as torch residuals.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
software", ACM TOMS 7 (1981) 17-41: 35 problems ``min sum_i f_i(x)^2`` with a
standard start ``x0``. Each :class:`Problem` gives the residual rows ``f(x)``
(m,) for ``x`` (n,) written out from the published definitions, the start, and
the published minimum of ``sum f_i^2`` where the paper lists one (``None``
otherwise). Sven and ``scipy.optimize.least_squares`` minimise
``0.5 sum f_i^2``: half the tabulated value.

The set covers narrow curved valleys (Rosenbrock, Wood, helical valley),
singular solutions (Powell singular, Bard's and Box's degenerate directions),
bad scaling (Powell and Brown badly scaled, Meyer), zero-residual and
large-residual problems (Jennrich-Sampson, Brown-Dennis, Osborne).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PROBLEMS", "Problem", "get_problem"]


@dataclass(frozen=True)
class Problem:
    """One test problem.

    Attributes:
        number: the problem's number in Moré, Garbow and Hillstrom (1981).
        name: short name.
        n: number of unknowns.
        m: number of residual rows.
        x0: the standard starting point (n numbers).
        residuals: ``f(x)`` (m,) for ``x`` (n,), differentiable by autograd.
        fmin: the published minimum of ``sum_i f_i^2`` (None when not listed).
    """

    number: int
    name: str
    n: int
    m: int
    x0: tuple[float, ...]
    residuals: Callable[[Tensor], Tensor]
    fmin: float | None

    def start(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """A fresh leaf tensor at ``x0`` that requires grad."""
        return torch.tensor(self.x0, dtype=dtype, requires_grad=True)


def _idx(k: int, x: Tensor, start: int = 1) -> Tensor:
    return torch.arange(start, start + k, dtype=x.dtype, device=x.device)


def _const(values: list[float], x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------- n = 2
def rosenbrock(x: Tensor) -> Tensor:
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x: Tensor) -> Tensor:
    return torch.stack(
        [
            -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
            -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
        ]
    )


def powell_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def beale(x: Tensor) -> Tensor:
    y = _const([1.5, 2.25, 2.625], x)
    i = _idx(3, x)
    return y - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x: Tensor, m: int = 10) -> Tensor:
    i = _idx(m, x)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


# ----------------------------------------------------------------- n = 3
def helical_valley(x: Tensor) -> Tensor:
    theta = torch.atan(x[1] / x[0]) / (2 * math.pi) + 0.5 * (x[0] < 0).to(x.dtype)
    return torch.stack(
        [10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]]
    )


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x: Tensor) -> Tensor:
    u = _idx(15, x)
    v = 16 - u
    w = torch.minimum(u, v)
    return _const(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSSIAN_Y = [
    0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
    0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009,
]  # fmt: skip


def gaussian(x: Tensor) -> Tensor:
    t = (8 - _idx(15, x)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _const(_GAUSSIAN_Y, x)


_MEYER_Y = [
    34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0,
    8261.0, 7030.0, 6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0,
]  # fmt: skip


def meyer(x: Tensor) -> Tensor:
    t = 45 + 5 * _idx(16, x)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _const(_MEYER_Y, x)


def gulf(x: Tensor, m: int = 99) -> Tensor:
    t = _idx(m, x) / 100
    y = 25 + (-50 * torch.log(t)) ** (2 / 3)
    return torch.exp(-(torch.abs(y - x[1]) ** x[2]) / x[0]) - t


def box_3d(x: Tensor, m: int = 10) -> Tensor:
    t = 0.1 * _idx(m, x)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


# ----------------------------------------------------------------- n = 4..11
def powell_singular(x: Tensor) -> Tensor:
    return torch.stack(
        [
            x[0] + 10 * x[1],
            math.sqrt(5) * (x[2] - x[3]),
            (x[1] - 2 * x[2]) ** 2,
            math.sqrt(10) * (x[0] - x[3]) ** 2,
        ]
    )


def wood(x: Tensor) -> Tensor:
    return torch.stack(
        [
            10 * (x[1] - x[0] ** 2),
            1 - x[0],
            math.sqrt(90) * (x[3] - x[2] ** 2),
            1 - x[2],
            math.sqrt(10) * (x[1] + x[3] - 2),
            (x[1] - x[3]) / math.sqrt(10),
        ]
    )


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x: Tensor) -> Tensor:
    u = _const(_KO_U, x)
    return _const(_KO_Y, x) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x: Tensor, m: int = 20) -> Tensor:
    t = _idx(m, x) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OSBORNE1_Y = [
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
    0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
    0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406,
]  # fmt: skip


def osborne1(x: Tensor) -> Tensor:
    t = 10 * _idx(33, x, start=0)
    model = x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4])
    return _const(_OSBORNE1_Y, x) - model


def biggs_exp6(x: Tensor, m: int = 13) -> Tensor:
    t = 0.1 * _idx(m, x)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return (
        x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    )


_OSBORNE2_Y = [
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746,
    0.679, 0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649,
    0.694, 0.644, 0.624, 0.661, 0.612, 0.558, 0.533, 0.495, 0.500, 0.423, 0.395,
    0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429, 0.523, 0.562, 0.607, 0.653,
    0.672, 0.708, 0.633, 0.668, 0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739,
    0.710, 0.729, 0.720, 0.636, 0.581, 0.428, 0.292, 0.162, 0.098, 0.054,
]  # fmt: skip


def osborne2(x: Tensor) -> Tensor:
    t = _idx(65, x, start=0) / 10
    model = (
        x[0] * torch.exp(-t * x[4])
        + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
        + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6])
        + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7])
    )
    return _const(_OSBORNE2_Y, x) - model


def watson(x: Tensor) -> Tensor:
    n = x.numel()
    t = _idx(29, x) / 29
    j = _idx(n, x, start=0)  # exponents 0..n-1
    powers = t[:, None] ** j[None, :]  # (29, n): t^(j-1) for j = 1..n
    deriv = (powers[:, : n - 1] * j[1:] * x[1:]).sum(1)  # sum_{j>=2} (j-1) x_j t^(j-2)
    value = (powers * x).sum(1)  # sum_j x_j t^(j-1)
    rows = deriv - value**2 - 1
    return torch.cat([rows, torch.stack([x[0], x[1] - x[0] ** 2 - 1])])


# ---------------------------------------------------------- variable dimension
def extended_rosenbrock(x: Tensor) -> Tensor:
    odd, even = x[0::2], x[1::2]
    return torch.stack([10 * (even - odd**2), 1 - odd], dim=1).reshape(-1)


def extended_powell_singular(x: Tensor) -> Tensor:
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    rows = [a + 10 * b, math.sqrt(5) * (c - d), (b - 2 * c) ** 2, math.sqrt(10) * (a - d) ** 2]
    return torch.stack(rows, dim=1).reshape(-1)


def penalty1(x: Tensor) -> Tensor:
    return torch.cat([math.sqrt(1e-5) * (x - 1), (x.square().sum() - 0.25).reshape(1)])


def penalty2(x: Tensor) -> Tensor:
    n = x.numel()
    a = math.sqrt(1e-5)
    i = _idx(n - 1, x, start=2)
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    middle = a * (torch.exp(x[1:] / 10) + torch.exp(x[:-1] / 10) - y)
    tail = a * (torch.exp(x[1:] / 10) - math.exp(-0.1))
    weights = n - _idx(n, x) + 1
    last = (weights * x.square()).sum() - 1
    return torch.cat([(x[0] - 0.2).reshape(1), middle, tail, last.reshape(1)])


def variably_dimensioned(x: Tensor) -> Tensor:
    s = (_idx(x.numel(), x) * (x - 1)).sum()
    return torch.cat([x - 1, s.reshape(1), (s**2).reshape(1)])


def trigonometric(x: Tensor) -> Tensor:
    n = x.numel()
    return n - torch.cos(x).sum() + _idx(n, x) * (1 - torch.cos(x)) - torch.sin(x)


def brown_almost_linear(x: Tensor) -> Tensor:
    n = x.numel()
    return torch.cat([x[:-1] + x.sum() - (n + 1), (torch.prod(x) - 1).reshape(1)])


def _grid(x: Tensor) -> tuple[float, Tensor]:
    h = 1 / (x.numel() + 1)
    return h, h * _idx(x.numel(), x)


def discrete_boundary_value(x: Tensor) -> Tensor:
    h, t = _grid(x)
    zero = x.new_zeros(1)
    left, right = torch.cat([zero, x[:-1]]), torch.cat([x[1:], zero])
    return 2 * x - left - right + h**2 * (x + t + 1) ** 3 / 2


def discrete_integral_equation(x: Tensor) -> Tensor:
    h, t = _grid(x)
    cube = (x + t + 1) ** 3
    lower = torch.cumsum(t * cube, 0)  # sum_{j <= i} t_j (x_j + t_j + 1)^3
    upper_all = torch.flip(torch.cumsum(torch.flip((1 - t) * cube, [0]), 0), [0])
    upper = torch.cat([upper_all[1:], x.new_zeros(1)])  # sum_{j > i}
    return x + h * ((1 - t) * lower + t * upper) / 2


def broyden_tridiagonal(x: Tensor) -> Tensor:
    zero = x.new_zeros(1)
    left, right = torch.cat([zero, x[:-1]]), torch.cat([x[1:], zero])
    return (3 - 2 * x) * x - left - 2 * right + 1


def broyden_banded(x: Tensor, lower: int = 5, upper: int = 1) -> Tensor:
    n = x.numel()
    i = torch.arange(n, device=x.device)
    offset = i[None, :] - i[:, None]  # j - i
    band = ((offset >= -lower) & (offset <= upper) & (offset != 0)).to(x.dtype)
    return x * (2 + 5 * x**2) + 1 - band @ (x * (1 + x))


def linear_full_rank(x: Tensor, m: int = 10) -> Tensor:
    n = x.numel()
    s = 2 * x.sum() / m
    return torch.cat([x - s - 1, (-s - 1).expand(m - n)])


def linear_rank1(x: Tensor, m: int = 10) -> Tensor:
    return _idx(m, x) * (_idx(x.numel(), x) * x).sum() - 1


def linear_rank1_zero(x: Tensor, m: int = 10) -> Tensor:
    n = x.numel()
    s = (_idx(n - 2, x, start=2) * x[1 : n - 1]).sum()
    middle = _idx(m - 2, x) * s - 1  # (i - 1) s - 1 for i = 2..m-1
    minus_one = x.new_full((1,), -1.0)
    return torch.cat([minus_one, middle, minus_one])


def chebyquad(x: Tensor, m: int | None = None) -> Tensor:
    n = x.numel()
    m = n if m is None else m
    y = 2 * x - 1
    t_prev, t_cur = torch.ones_like(y), y
    rows = []
    for i in range(1, m + 1):
        exact = -1.0 / (i * i - 1) if i % 2 == 0 else 0.0
        rows.append(t_cur.mean() - exact)
        t_prev, t_cur = t_cur, 2 * y * t_cur - t_prev
    return torch.stack(rows)


def _problem(number, name, x0, residuals, fmin, m=None) -> Problem:
    x = torch.tensor(x0, dtype=torch.float64)
    rows = residuals(x).numel() if m is None else m
    return Problem(number, name, len(x0), rows, tuple(float(v) for v in x0), residuals, fmin)


def _build() -> dict[str, Problem]:
    problems = [
        _problem(1, "rosenbrock", [-1.2, 1.0], rosenbrock, 0.0),
        _problem(2, "freudenstein_roth", [0.5, -2.0], freudenstein_roth, 48.9842536792400),
        _problem(3, "powell_badly_scaled", [0.0, 1.0], powell_badly_scaled, 0.0),
        _problem(4, "brown_badly_scaled", [1.0, 1.0], brown_badly_scaled, 0.0),
        _problem(5, "beale", [1.0, 1.0], beale, 0.0),
        _problem(6, "jennrich_sampson", [0.3, 0.4], jennrich_sampson, 124.362182355),
        _problem(7, "helical_valley", [-1.0, 0.0, 0.0], helical_valley, 0.0),
        _problem(8, "bard", [1.0, 1.0, 1.0], bard, 8.21487730657e-3),
        _problem(9, "gaussian", [0.4, 1.0, 0.0], gaussian, 1.12793276961e-8),
        _problem(10, "meyer", [0.02, 4000.0, 250.0], meyer, 87.9458551718),
        _problem(11, "gulf", [5.0, 2.5, 0.15], gulf, 0.0),
        _problem(12, "box_3d", [0.0, 10.0, 20.0], box_3d, 0.0),
        _problem(13, "powell_singular", [3.0, -1.0, 0.0, 1.0], powell_singular, 0.0),
        _problem(14, "wood", [-3.0, -1.0, -3.0, -1.0], wood, 0.0),
        _problem(15, "kowalik_osborne", [0.25, 0.39, 0.415, 0.39], kowalik_osborne, 3.07505e-4),
        _problem(16, "brown_dennis", [25.0, 5.0, -5.0, -1.0], brown_dennis, 85822.2016263563),
        _problem(17, "osborne1", [0.5, 1.5, -1.0, 0.01, 0.02], osborne1, 5.46489469748e-5),
        _problem(18, "biggs_exp6", [1.0, 2.0, 1.0, 1.0, 1.0, 1.0], biggs_exp6, 0.0),
        _problem(
            19,
            "osborne2",
            [1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5],
            osborne2,
            4.01377e-2,
        ),
        _problem(20, "watson", [0.0] * 6, watson, 2.28767e-3),
        _problem(21, "extended_rosenbrock", [-1.2, 1.0] * 5, extended_rosenbrock, 0.0),
        _problem(
            22, "extended_powell_singular", [3.0, -1.0, 0.0, 1.0] * 2, extended_powell_singular, 0.0
        ),
        _problem(23, "penalty1", [1.0, 2.0, 3.0, 4.0], penalty1, 2.24997e-5),
        _problem(24, "penalty2", [0.5] * 4, penalty2, 9.37629e-6),
        _problem(
            25,
            "variably_dimensioned",
            [1 - j / 10 for j in range(1, 11)],
            variably_dimensioned,
            0.0,
        ),
        _problem(26, "trigonometric", [0.1] * 10, trigonometric, 0.0),
        _problem(27, "brown_almost_linear", [0.5] * 10, brown_almost_linear, 0.0),
        _problem(
            28,
            "discrete_boundary_value",
            [(j / 11) * (j / 11 - 1) for j in range(1, 11)],
            discrete_boundary_value,
            0.0,
        ),
        _problem(
            29,
            "discrete_integral_equation",
            [(j / 11) * (j / 11 - 1) for j in range(1, 11)],
            discrete_integral_equation,
            0.0,
        ),
        _problem(30, "broyden_tridiagonal", [-1.0] * 10, broyden_tridiagonal, 0.0),
        _problem(31, "broyden_banded", [-1.0] * 10, broyden_banded, 0.0),
        _problem(32, "linear_full_rank", [1.0] * 5, linear_full_rank, 5.0),
        _problem(33, "linear_rank1", [1.0] * 5, linear_rank1, 10 * 9 / (2 * 21)),
        _problem(34, "linear_rank1_zero", [1.0] * 5, linear_rank1_zero, (100 + 30 - 6) / (2 * 17)),
        _problem(35, "chebyquad", [j / 9 for j in range(1, 9)], chebyquad, 3.51687e-3),
    ]
    return {p.name: p for p in problems}


#: name -> Problem, in the paper's order.
PROBLEMS: dict[str, Problem] = _build()


def get_problem(name: str) -> Problem:
    """The problem called ``name`` (see :data:`PROBLEMS`)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    return PROBLEMS[name]
