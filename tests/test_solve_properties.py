"""Property tests of the pure solve against the float64 reference pseudo-inverse.

Random shapes (N < P and N > P), ranks, scales 1e-8..1e8 and duplicated rows.
Every example is kept only when the cut-off is unambiguous: each singular value
(of the matrix actually solved, computed by the reference SVD) lies at least a
factor GAP away from the effective threshold, and a rank cap falls between
clearly separated values. The rest are discarded with ``assume``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from torchsven.solve import (
    SpectralFilter,
    gram_coefficients,
    gram_floor,
    jacobian_step,
    normal_step,
    svd_step,
)

from .reference import reference_filter, reference_step, rel_err

GAP = 10.0
EPS = torch.finfo(torch.float64).eps
SETTINGS = settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@st.composite
def problems(draw):
    """(J, r, filter kwargs, relative damping) with a known-clean spectrum."""
    n0 = draw(st.integers(1, 9))
    p = draw(st.integers(1, 9))
    k = draw(st.integers(0, min(n0, p)))  # rank of J
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.floats(-8, 8))
    exponents = sorted(draw(st.lists(st.floats(0, 6), min_size=k, max_size=k)))
    s = torch.tensor([10.0 ** (-e) for e in exponents], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(n0, max(k, 1), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, max(k, 1), generator=g, dtype=torch.float64))
    base = scale * (u[:, :k] * s) @ v[:, :k].T
    duplicates = draw(st.lists(st.integers(0, n0 - 1), max_size=4))
    jac = torch.cat([base, base[duplicates]]) if duplicates else base  # duplicate rows
    rows = torch.randn(jac.shape[0], generator=g, dtype=torch.float64)
    rows = rows * 10.0 ** draw(st.floats(-4, 4))
    rank = draw(st.one_of(st.none(), st.integers(1, 10)))
    rtol = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1e-1]))
    atol = draw(st.sampled_from([0.0, 1e-10, 1e-3])) * scale
    damping = draw(st.sampled_from([0.0, 1e-4, 1.0])) * scale**2
    relative = draw(st.sampled_from([0.0, 0.0, 1e-3]))
    return jac, rows, {"rank": rank, "rtol": rtol, "atol": atol, "damping": damping}, relative


def _threshold(s: Tensor, kwargs: dict, floor: float) -> float | None:
    """The library's cut ``max(rtol s_1, atol, floor)``, or None when it is ambiguous.

    Unambiguous: every singular value (round-off zeros included) lies more than a
    factor GAP away from the cut, and a rank cap falls between values at least 1%
    apart, so the library and the reference keep the same directions.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    s1 = float(s[0])
    threshold = max(kwargs["rtol"] * s1, kwargs["atol"], floor)
    if any(threshold / GAP <= v <= threshold * GAP for v in s.tolist()):
        return None
    kept = [v for v in s.tolist() if v > threshold]
    if any(v < 1e3 * EPS * s1 for v in kept):
        return None  # a round-off value would be inverted: not a meaningful problem
    rank = kwargs["rank"]
    if rank is not None and rank < len(kept) and kept[rank] > kept[rank - 1] * (1 - 1e-2):
        return None
    return threshold


def _expected(jac, rows, kwargs, relative, threshold):
    """Reference SVD step with the same cut (given explicitly) and damping."""
    s1 = float(torch.linalg.svdvals(jac)[0])
    mu = kwargs["damping"] + relative * s1**2
    return reference_step(jac, rows, rank=kwargs["rank"], rtol=threshold / s1, atol=0.0, damping=mu)


def _tolerance(solver: str, s: Tensor, kept: int, mu: float, rank_cut: bool) -> float:
    """Accuracy of each route: ~eps s_1/s_k for an SVD, ~eps (s_1/s_k)^2 for a Gram
    eigh, plus the singular-subspace error eps s_1 / gap at a rank cap."""
    if kept == 0:
        return 0.0
    s1, sk = float(s[0]), float(s[kept - 1])
    # eigenvectors of a Gram matrix are accurate to eps e_1 / gap whatever the damping;
    # the constant covers eigh's O(n eps ||K||) backward error at these sizes (hypothesis
    # found 126 eps (s_1/s_k)^2 on a 0-damping problem; 100 was too tight)
    svd_tol, gram_tol = 100 * EPS * s1 / sk, 1000 * EPS * s1**2 / sk**2
    tol = svd_tol if solver == "svd" else gram_tol
    if rank_cut and kept < s.numel():
        tol += 100 * EPS * s1 / max(sk - float(s[kept]), 1e-300)
    return max(1e-10, tol)


def _check(step, expected, tol):
    if float(expected.norm()) == 0.0:
        assert float(step.norm()) <= 1e-12 * max(1.0, float(step.abs().max()))
    else:
        assert rel_err(step, expected) <= tol


@SETTINGS
@given(problems(), st.sampled_from(["svd", "gram", "normal"]))
def test_jacobian_step_equals_reference_pinv(problem, solver):
    jac, rows, kwargs, relative = problem
    n, p = jac.shape
    s = torch.linalg.svdvals(jac)
    floor = 0.0 if solver == "svd" else gram_floor(n if solver == "gram" else p, s[0])
    threshold = _threshold(s, kwargs, floor)
    assume(threshold is not None)
    expected, kept, _ = _expected(jac, rows, kwargs, relative, threshold)
    filt = SpectralFilter(**kwargs, relative_damping=relative)
    step, info = jacobian_step(jac, rows, filt, solver)
    assert info.solver == solver
    assert info.kept == kept
    rank_cut = kwargs["rank"] is not None
    _check(step, expected, _tolerance(solver, s, kept, filt.mu(s[0]), rank_cut))


@SETTINGS
@given(problems())
def test_gram_coefficients_give_the_reference_step(problem):
    jac, rows, kwargs, relative = problem
    s = torch.linalg.svdvals(jac)
    threshold = _threshold(s, kwargs, gram_floor(jac.shape[0], s[0]))
    assume(threshold is not None)
    expected, kept, _ = _expected(jac, rows, kwargs, relative, threshold)
    filt = SpectralFilter(**kwargs, relative_damping=relative)
    coeffs, info = gram_coefficients(jac @ jac.T, rows, filt)
    assert info.kept == kept
    rank_cut = kwargs["rank"] is not None
    _check(jac.T @ coeffs, expected, _tolerance("gram", s, kept, filt.mu(s[0]), rank_cut))


@SETTINGS
@given(problems(), st.sampled_from(["svd", "normal"]))
def test_svd_and_normal_steps_equal_reference(problem, solver):
    jac, rows, kwargs, relative = problem
    s = torch.linalg.svdvals(jac)
    floor = 0.0 if solver == "svd" else gram_floor(jac.shape[1], s[0])
    threshold = _threshold(s, kwargs, floor)
    assume(threshold is not None)
    expected, kept, _ = _expected(jac, rows, kwargs, relative, threshold)
    filt = SpectralFilter(**kwargs, relative_damping=relative)
    if solver == "svd":
        step, info = svd_step(jac, rows, filt)
    else:
        step, info = normal_step(jac.T @ jac, jac.T @ rows, filt)
    assert info.kept == kept
    rank_cut = kwargs["rank"] is not None
    _check(step, expected, _tolerance(solver, s, kept, filt.mu(s[0]), rank_cut))


@SETTINGS
@given(
    st.lists(st.floats(-8, 8), min_size=1, max_size=12),
    st.one_of(st.none(), st.integers(1, 12)),
    st.sampled_from([0.0, 1e-6, 1e-3, 0.1]),
    st.sampled_from([0.0, 1e-10, 1e-2]),
    st.sampled_from([0.0, 1e-3, 10.0]),
)
def test_filter_inverse_equals_reference(exponents, rank, rtol, atol, damping):
    s = torch.tensor(sorted((10.0**e for e in exponents), reverse=True), dtype=torch.float64)
    threshold = max(rtol * float(s[0]), atol)
    assume(all(not (threshold / GAP <= v <= threshold * GAP) for v in s.tolist()))
    phi, mask = SpectralFilter(rank, rtol, atol, damping).inverse(s)
    expected = reference_filter(s, rank=rank, rtol=rtol, atol=atol, damping=damping)
    torch.testing.assert_close(phi, expected, rtol=1e-14, atol=0)
    assert int(mask.sum()) == int((expected != 0).sum())
    # inverse_square on e = s^2 is phi(s) / s
    weights, mask2 = SpectralFilter(rank, rtol, atol, damping).inverse_square(s * s)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(weights[mask], (expected / s)[mask], rtol=1e-12, atol=0)


@given(st.floats(1e-8, 1e8), st.floats(0, 1e3))
def test_relative_damping_is_scale_free(scale, relative):
    # mu = lambda s_1^2: scaling J by c scales the damped step by 1/c exactly as undamped
    s = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64)
    filt = SpectralFilter(rtol=0.0, atol=0.0, relative_damping=relative)
    phi, _ = filt.inverse(s)
    phi_scaled, _ = filt.inverse(scale * s)
    torch.testing.assert_close(phi_scaled * scale, phi, rtol=1e-12, atol=0)
    assert filt.mu(3.0 * scale) == pytest.approx(relative * 9.0 * scale**2, rel=1e-15)


@pytest.mark.parametrize(("n", "p"), [(0, 3), (3, 0), (0, 0)])
def test_empty_problems_give_zero_steps(n, p):
    step, info = jacobian_step(torch.zeros(n, p), torch.zeros(n), SpectralFilter())
    assert step.shape == (p,) and info.kept == 0 and not step.any()


def test_unknown_solver_is_a_documented_error():
    with pytest.raises(ValueError, match="solver must be one of"):
        jacobian_step(torch.eye(3), torch.ones(3), SpectralFilter(), "lu")


def test_nonfinite_matrix_does_not_pass_silently():
    # The solve itself has no finite check (the backends and Sven.step raise
    # NonFiniteError first); a NaN input surfaces as an error or a NaN step.
    jac = torch.eye(3, dtype=torch.float64)
    jac[0, 1] = math.nan
    try:
        step, _ = svd_step(jac, torch.ones(3, dtype=torch.float64), SpectralFilter())
    except RuntimeError:
        return
    assert not torch.isfinite(step).all()
