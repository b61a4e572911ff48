"""The MGH problem set: definitions at known solutions, and Sven's adaptive damping on a few."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

import torchsven
from torchsven.problems import PROBLEMS, get_problem

# Known exact solutions from Moré, Garbow and Hillstrom (1981): all rows vanish.
ZEROS = {
    "rosenbrock": [1.0, 1.0],
    "brown_badly_scaled": [1e6, 2e-6],
    "beale": [3.0, 0.5],
    "helical_valley": [1.0, 0.0, 0.0],
    "gulf": [50.0, 25.0, 1.5],
    "box_3d": [1.0, 10.0, 1.0],
    "powell_singular": [0.0, 0.0, 0.0, 0.0],
    "wood": [1.0, 1.0, 1.0, 1.0],
    "biggs_exp6": [1.0, 10.0, 1.0, 5.0, 4.0, 3.0],
    "extended_rosenbrock": [1.0] * 10,
    "variably_dimensioned": [1.0] * 10,
    "brown_almost_linear": [1.0] * 10,
}


@pytest.mark.parametrize("name", sorted(ZEROS))
def test_rows_vanish_at_the_published_solution(name):
    problem = get_problem(name)
    x = torch.tensor(ZEROS[name], dtype=torch.float64)
    rows = problem.residuals(x)
    assert rows.shape == (problem.m,)
    assert float(rows.abs().max()) <= 1e-12


def test_every_problem_has_its_shape_and_a_finite_start():
    assert len(PROBLEMS) == 35
    assert [p.number for p in PROBLEMS.values()] == list(range(1, 36))
    for p in PROBLEMS.values():
        x = p.start()
        rows = p.residuals(x)
        assert x.shape == (p.n,) and rows.shape == (p.m,) and p.m >= p.n
        assert torch.isfinite(rows).all()
        (grad,) = torch.autograd.grad(rows.square().sum(), x)
        assert torch.isfinite(grad).all()


def test_linear_problems_have_their_closed_form_minimum():
    # linear full rank: minimum m - n; rank 1: m(m-1) / (2(2m+1)) (MGH 32, 33)
    for name, expected in [("linear_full_rank", 5.0), ("linear_rank1", 90 / 42)]:
        p = get_problem(name)
        jac = torch.autograd.functional.jacobian(p.residuals, torch.zeros(p.n, dtype=torch.float64))
        r0 = p.residuals(torch.zeros(p.n, dtype=torch.float64))
        x = -torch.linalg.pinv(jac) @ r0
        assert float(p.residuals(x).square().sum()) == pytest.approx(expected, rel=1e-12)
        assert p.fmin == pytest.approx(expected, rel=1e-12)


def test_unknown_problem():
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("himmelblau")


# (problem, steps): valleys, a large-residual local minimum, nonzero-residual fits;
# Sven must reach scipy's LM cost (MINPACK, tolerances 1e-15) within 1e-8 relative.
SOLVED = [
    ("rosenbrock", 40),
    ("helical_valley", 30),
    ("freudenstein_roth", 60),
    ("bard", 30),
    ("kowalik_osborne", 40),
    ("box_3d", 40),
]


@pytest.mark.parametrize(("name", "steps"), SOLVED)
def test_adaptive_damping_reaches_the_published_minimum(name, steps):
    problem = get_problem(name)
    x = problem.start()
    opt = torchsven.Sven([x], damping="adaptive")
    for _ in range(steps):
        opt.step(lambda: problem.residuals(x))
    cost = 0.5 * float(problem.residuals(x.detach()).square().sum())
    reference = _scipy_lm_cost(problem)
    assert cost <= reference * (1 + 1e-8) + 1e-24
    # and the published minimum (given to 6-12 digits) of sum f_i^2 = 2 cost
    assert 2 * cost == pytest.approx(problem.fmin, rel=1e-5, abs=1e-20)


def _scipy_lm_cost(problem) -> float:
    def fun(v):
        return problem.residuals(torch.from_numpy(v)).numpy()

    def jac(v):
        return torch.autograd.functional.jacobian(problem.residuals, torch.from_numpy(v)).numpy()

    x0 = np.array(problem.x0, dtype=np.float64)
    res = least_squares(fun, x0, jac=jac, method="lm", ftol=1e-15, xtol=1e-15, gtol=1e-15)
    return 0.5 * float(np.sum(fun(res.x) ** 2))


def test_powell_singular_converges_despite_the_singular_solution():
    problem = get_problem("powell_singular")
    x = problem.start()
    opt = torchsven.Sven([x], damping="adaptive")
    costs = []
    for _ in range(60):
        opt.step(lambda: problem.residuals(x))
        costs.append(opt.last_step.loss)
    assert costs[-1] < 1e-12 * costs[0]
    assert all(b <= a for a, b in itertools.pairwise(costs))  # never increases
