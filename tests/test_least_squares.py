"""torchsven.least_squares against scipy.optimize.least_squares on small problems."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch

import torchsven
from torchsven.least_squares import LOSSES, _Spectral, robust_rho
from torchsven.problems import PROBLEMS


def _numpy(fun):
    return lambda v: fun(torch.from_numpy(np.array(v))).numpy()


def _numpy_jac(fun):
    return lambda v: torch.autograd.functional.jacobian(fun, torch.from_numpy(np.array(v))).numpy()


def _scipy(fun, x0, **options):
    return scipy.optimize.least_squares(_numpy(fun), x0.numpy(), jac=_numpy_jac(fun), **options)


# ------------------------------------------------------------- MGH vs MINPACK
@pytest.mark.parametrize(
    ("name", "mult"),
    [
        ("rosenbrock", 1),
        ("rosenbrock", 10),
        ("bard", 1),
        ("box_3d", 10),
        ("meyer", 1),
        ("osborne2", 1),
        ("penalty2", 1),
        ("watson", 1),
        ("linear_rank1", 1),
    ],
)
def test_mgh_matches_minpack(name: str, mult: int) -> None:
    problem = PROBLEMS[name]
    x0 = torch.tensor(problem.x0, dtype=torch.float64) * mult
    ref = _scipy(problem.residuals, x0, method="lm")
    for method in ("lm", "trf"):
        res = torchsven.least_squares(problem.residuals, x0, method=method)
        assert res.success
        assert res.cost <= ref.cost * (1 + 1e-8) + 1e-20
        assert res.nfev <= 1.5 * ref.nfev + 2
        # one Jacobian per accepted step; every other evaluation is a retried trial
        assert res.nfev - res.njev == res.extras["rejected"]


def test_meyer_with_given_x_scale() -> None:
    problem = PROBLEMS["meyer"]
    x0 = problem.start().detach()
    res = torchsven.least_squares(problem.residuals, x0, x_scale=torch.tensor([1e-2, 1e4, 1e2]))
    assert res.cost == pytest.approx(43.97292759, rel=1e-8)


def test_rank_deficient_zero_residual_problem_reaches_round_off() -> None:
    problem = PROBLEMS["powell_singular"]
    res = torchsven.least_squares(problem.residuals, problem.start().detach())
    assert res.status == 1 and res.cost < 1e-30


# ---------------------------------------------------------- losses and bounds
_T = torch.linspace(0, 10, 40, dtype=torch.float64)
_Y = 3 * torch.exp(-0.4 * _T) + 0.5 + 0.05 * torch.sin(7 * _T)
_Y[::7] += 2.0


def _decay(x: torch.Tensor) -> torch.Tensor:
    return x[0] * torch.exp(-x[1] * _T) + x[2] - _Y


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("f_scale", [1.0, 0.1])
@pytest.mark.parametrize("bounded", [False, True])
def test_losses_and_bounds_match_scipy_trf(loss: str, f_scale: float, bounded: bool) -> None:
    if bounded:
        lb, ub = [0.0, 0.0, 0.6], [2.5, 0.35, 5.0]
        x0 = torch.tensor([1.0, 0.2, 1.0], dtype=torch.float64)
    else:
        lb, ub = [-np.inf] * 3, [np.inf] * 3
        x0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    tol = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15)
    ref = _scipy(_decay, x0, loss=loss, f_scale=f_scale, bounds=(lb, ub), **tol)
    res = torchsven.least_squares(
        _decay, x0, loss=loss, f_scale=f_scale,
        bounds=(torch.tensor(lb, dtype=torch.float64), torch.tensor(ub, dtype=torch.float64)),
        **tol,
    )  # fmt: skip
    assert res.success
    assert np.abs(res.x.numpy() - ref.x).max() < 1e-6
    assert res.cost == pytest.approx(ref.cost, rel=1e-10)
    assert np.array_equal(res.active_mask.numpy(), ref.active_mask.astype(np.int64))
    np.testing.assert_allclose(res.grad.numpy(), ref.grad, atol=1e-5)
    np.testing.assert_allclose(res.jac.numpy(), ref.jac, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "lb", "ub"),
    [
        ("rosenbrock", [-np.inf, 1.5], np.inf),
        ("beale", -np.inf, [2.8, 0.4]),
        ("wood", -0.5, 0.8),
        ("powell_singular", [0.1, -np.inf, -np.inf, 0.1], np.inf),
    ],
)
def test_bounded_mgh_matches_scipy_trf(name: str, lb, ub) -> None:
    problem = PROBLEMS[name]
    x0 = np.array(problem.x0)
    lbv = np.broadcast_to(np.asarray(lb, float), x0.shape).copy()
    ubv = np.broadcast_to(np.asarray(ub, float), x0.shape).copy()
    start = torch.from_numpy(np.clip(x0, lbv, ubv))
    tol = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15)
    ref = _scipy(problem.residuals, start, bounds=(lbv, ubv), **tol)
    res = torchsven.least_squares(
        problem.residuals, start, bounds=(torch.from_numpy(lbv), torch.from_numpy(ubv)), **tol
    )
    assert np.abs(res.x.numpy() - ref.x).max() < 1e-6
    assert res.cost == pytest.approx(ref.cost, rel=1e-9, abs=1e-20)
    assert bool(((res.x.numpy() >= lbv) & (res.x.numpy() <= ubv)).all())


@pytest.mark.parametrize("loss", LOSSES)
def test_rho_derivatives_by_autograd(loss: str) -> None:
    z = torch.tensor([0.0, 0.3, 1.0, 2.5, 40.0], dtype=torch.float64, requires_grad=True)
    rho0, rho1, rho2 = robust_rho(z, loss)
    (d1,) = torch.autograd.grad(rho0.sum(), z, create_graph=True)
    assert torch.allclose(rho1, d1, atol=1e-14)
    if loss == "linear":
        assert not rho2.any()
        return
    (d2,) = torch.autograd.grad(d1[1:].sum(), z)  # huber's kink at z = 1 excluded below
    keep = torch.tensor([False, True, loss != "huber", True, True])
    assert torch.allclose(rho2[keep], d2[keep], atol=1e-14)


# ------------------------------------------------------------- spectral solve
def test_spectral_prediction_equals_direct_model() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    a[:, 3] = a[:, 0] * 1e-3  # ill-conditioned
    f = torch.randn(9, generator=gen, dtype=torch.float64)
    spectral = _Spectral.of(a, f)
    for mu in (0.0, 1e-8, 0.3, 10.0):
        z = spectral.step(mu)
        direct = 0.5 * (f.dot(f) - (f + a @ z).square().sum())
        predicted, fitted, damped = spectral.predicted(mu)
        assert predicted == pytest.approx(float(direct), rel=1e-10)
        assert fitted == pytest.approx(float((a @ z).square().sum()), rel=1e-10)
        assert damped == pytest.approx(mu * float(z.square().sum()), rel=1e-10, abs=1e-300)
        if mu > 0:
            reference = torch.linalg.solve(a.mT @ a + mu * torch.eye(4, dtype=a.dtype), -a.mT @ f)
            assert torch.allclose(z, reference, rtol=1e-9)
    radius = 0.5 * spectral.norm(0.0)
    mu = spectral.solve_radius(radius)
    assert mu > 0 and abs(float(spectral.step(mu).norm()) - radius) <= 0.1 * radius


# --------------------------------------------------------- shapes and result
def test_any_shape_and_float32() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, -1.0]])

    def fun(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x - target) * 2.0, torch.sin(x) - torch.sin(target)])

    x0 = torch.zeros(2, 2, dtype=torch.float32)
    res = torchsven.least_squares(fun, x0)
    assert res.x.shape == (2, 2) and res.x.dtype == torch.float32
    assert res.fun.shape == (2, 2, 2) and res.fun.dtype == torch.float32
    assert torch.allclose(res.x, target, atol=1e-5)
    assert res.jac.shape == (8, 4) and res.grad.shape == (4,)
    assert torch.equal(x0, torch.zeros(2, 2))


def test_result_fields_like_scipy() -> None:
    problem = PROBLEMS["bard"]
    x0 = problem.start().detach()
    ref = _scipy(problem.residuals, x0, method="lm")
    res = torchsven.least_squares(problem.residuals, x0, method="lm")
    assert res.status == ref.status == 2
    assert res.message == ref.message and res.success
    assert res.cost == pytest.approx(ref.cost, rel=1e-10)
    np.testing.assert_allclose(res.fun.numpy(), ref.fun, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.jac.numpy(), ref.jac, rtol=1e-6)
    assert torch.allclose(res.grad, res.jac.mT @ res.fun.to(torch.float64))
    assert res.optimality == pytest.approx(float(res.grad.abs().max()))
    assert res["x"] is res.x and "njev" in list(res.keys())


@pytest.mark.parametrize("jac", ["forward", "reverse"])
def test_jacobian_modes_agree(jac: str) -> None:
    problem = PROBLEMS["osborne1"]
    x0 = problem.start().detach()
    auto = torchsven.least_squares(problem.residuals, x0)
    other = torchsven.least_squares(problem.residuals, x0, jac=jac)
    assert torch.allclose(auto.x, other.x, rtol=1e-9) and auto.nfev == other.nfev


def test_callable_jac_args_and_kwargs() -> None:
    def fun(x, a, *, b):
        return torch.stack([a * (x[1] - x[0] ** 2), b - x[0]])

    def jac(x, a, *, b):
        return torch.tensor([[-2 * a * x[0], a], [-1.0, 0.0]], dtype=x.dtype)

    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    res = torchsven.least_squares(fun, x0, jac=jac, args=(10.0,), kwargs={"b": 1.0})
    assert torch.allclose(res.x, torch.ones(2, dtype=torch.float64))


def test_function_that_vmap_cannot_run() -> None:
    def fun(x):
        out = torch.empty(3, dtype=x.dtype)
        out[0] = x[0] - 1  # in-place writes into a fresh tensor: no vmap
        out[1] = 10 * (x[1] - x[0] ** 2)
        out[2] = x[1] - 1
        return out

    res = torchsven.least_squares(fun, torch.tensor([-1.2, 1.0], dtype=torch.float64))
    assert res.success and torch.allclose(res.x, torch.ones(2, dtype=torch.float64))


def test_max_nfev_and_callback() -> None:
    problem = PROBLEMS["rosenbrock"]
    x0 = problem.start().detach()
    res = torchsven.least_squares(problem.residuals, x0, max_nfev=3)
    assert res.status == 0 and not res.success and res.nfev == 3
    seen = []

    def stop(intermediate_result):
        seen.append(intermediate_result["cost"])
        return len(seen) == 2

    res = torchsven.least_squares(problem.residuals, x0, callback=stop)
    assert res.status == -2 and len(seen) == 2

    def stop_x(x):
        raise StopIteration

    res = torchsven.least_squares(problem.residuals, x0, callback=stop_x, bounds=(-5, 5))
    assert res.status == -2


def test_verbose(capsys) -> None:
    problem = PROBLEMS["rosenbrock"]
    x0 = problem.start().detach()
    torchsven.least_squares(problem.residuals, x0)
    assert capsys.readouterr().out == ""
    torchsven.least_squares(problem.residuals, x0, verbose=1)
    captured = capsys.readouterr()
    assert "termination condition" in captured.out and captured.err == ""  # no tty: no live line
    res = torchsven.least_squares(problem.residuals, x0, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "Iteration" and len(lines) >= res.nit + 1


# ------------------------------------------------------------------ bad input
def _rosen(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


_X0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "dogleg"}, ValueError, "method"),
        ({"loss": "l1"}, ValueError, "loss"),
        ({"ftol": -1.0}, ValueError, "ftol"),
        ({"xtol": math.nan}, ValueError, "xtol"),
        ({"gtol": math.inf}, ValueError, "gtol"),
        ({"ftol": "1e-8"}, TypeError, "ftol"),
        ({"ftol": 0.0, "xtol": 0.0, "gtol": 0.0}, ValueError, "ftol, xtol, gtol"),
        ({"f_scale": 0.0}, ValueError, "f_scale"),
        ({"max_nfev": 0}, ValueError, "max_nfev"),
        ({"max_nfev": 2.5}, TypeError, "max_nfev"),
        ({"verbose": 3}, ValueError, "verbose"),
        ({"x_scale": -1.0}, ValueError, "x_scale"),
        ({"x_scale": "auto"}, ValueError, "x_scale"),
        ({"x_scale": torch.ones(3)}, ValueError, "x_scale"),
        ({"jac": "2-point"}, ValueError, "jac"),
        ({"bounds": (0.0,)}, ValueError, "bounds"),
        ({"bounds": (1.0, 1.0)}, ValueError, "lower bound"),
        ({"bounds": (torch.zeros(3), 5.0)}, ValueError, "lb"),
        ({"bounds": (-5.0, torch.ones(2, 2))}, ValueError, "ub"),
        ({"bounds": (0.0, 5.0)}, ValueError, "x0 is outside"),
        ({"bounds": (-5.0, 5.0), "method": "lm"}, ValueError, "bounds"),
        ({"callback": 3}, TypeError, "callback"),
        ({"args": [1]}, TypeError, "args"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    x0 = _X0.clone()
    with pytest.raises(error, match=match):
        torchsven.least_squares(_rosen, x0, **kwargs)
    assert torch.equal(x0, _X0)


def test_bad_functions_and_starts() -> None:
    with pytest.raises(ValueError, match="not finite at x0"):
        torchsven.least_squares(lambda x: torch.log(x), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="fun must return a tensor"):
        torchsven.least_squares(lambda x: [1.0], _X0)
    with pytest.raises(TypeError, match="fun must be callable"):
        torchsven.least_squares(None, _X0)
    with pytest.raises(TypeError, match="x0"):
        torchsven.least_squares(_rosen, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x0"):
        torchsven.least_squares(_rosen, torch.tensor([math.nan, 1.0]))
    calls = []

    def changing(x):
        calls.append(1)
        return x if len(calls) == 1 else torch.cat([x, x])

    with pytest.raises(ValueError, match="shape must not change"):
        torchsven.least_squares(changing, _X0)


# ------------------------------------------------------------------- README
_DOC = (Path(__file__).resolve().parents[1] / "docs" / "readme" / "least_squares.md").read_text()


def test_readme_section_example_runs(capsys) -> None:
    code = _DOC.split("```python")[1].split("```")[0]
    exec(compile(code, "least_squares.md", "exec"), {})
    assert "termination condition" in capsys.readouterr().out


def test_readme_section_documents_every_argument_and_field() -> None:
    cells = set(re.findall(r"^\|\s*`([A-Za-z_0-9]+)`(?:, `([A-Za-z_0-9]+)`)*", _DOC, flags=re.M))
    documented = {name for row in cells for name in row if name}
    documented |= set(re.findall(r"`([a-z_]+)`", " ".join(
        line.split("|")[1] for line in _DOC.splitlines() if line.startswith("| `")
    )))  # fmt: skip
    arguments = list(inspect.signature(torchsven.least_squares).parameters)
    fields = [f.name for f in dataclasses.fields(torchsven.LeastSquaresResult)]
    missing = [name for name in arguments + fields if name not in documented]
    assert not missing, f"docs/readme/least_squares.md misses: {missing}"


class _SquareNoForward(torch.autograd.Function):
    """x^2 with a backward but no forward-mode rule (as some libraries' ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_forward_mode_falls_back_to_reverse_mode() -> None:
    from torchsven.least_squares import _Problem

    def fun(x):
        return torch.stack([10 * (x[1] - _SquareNoForward.apply(x[0])), 1 - x[0], 0.5 * x[1]])

    problem = _Problem(fun, "auto", _X0, (), {})
    problem.residuals(_X0)
    jac = problem.jacobian(_X0, 2)
    assert problem.failed_modes == {"forward"}
    expected = torch.autograd.functional.jacobian(fun, _X0)
    assert torch.allclose(jac, expected)
    res = torchsven.least_squares(fun, _X0)
    ref = _scipy(fun, _X0, method="lm")
    assert res.success and res.cost == pytest.approx(ref.cost, rel=1e-8)


def test_bounds_shaped_like_a_2d_float32_start() -> None:
    target = torch.tensor([[0.5, -2.0], [3.0, 1.0]])

    def fun(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - target).reshape(-1), 0.1 * x.reshape(-1) ** 2])

    lb = torch.full((2, 2), -1.0)
    ub = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    x0 = torch.zeros(2, 2)
    res = torchsven.least_squares(fun, x0, bounds=(lb, ub), ftol=1e-12, xtol=1e-12, gtol=1e-10)
    ref = _scipy(
        lambda v: fun(v.float().reshape(2, 2)).double(),
        x0.double().reshape(-1),
        bounds=(lb.reshape(-1).numpy(), ub.reshape(-1).numpy()),
        ftol=1e-12, xtol=1e-12, gtol=1e-10,
    )  # fmt: skip
    assert res.x.shape == (2, 2) and res.x.dtype == torch.float32
    assert np.abs(res.x.reshape(-1).numpy() - ref.x).max() < 1e-5
    assert res.active_mask.tolist() == [0, -1, 1, 0]
