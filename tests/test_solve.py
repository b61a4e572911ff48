"""The pure solve (torchsven.solve) against the dense SVD reference."""

from __future__ import annotations

import pytest
import torch

from torchsven.solve import (
    SpectralFilter,
    choose_solver,
    gram_coefficients,
    gram_floor,
    jacobian_step,
    normal_step,
    svd_step,
)

from .cases import matrix_with_spectrum
from .reference import reference_filter, reference_pinv_step, reference_step, rel_err

# A spectrum with clear gaps: every cut-off used below falls inside a gap.
SPECTRUM = [10.0, 6.0, 3.0, 1.0, 0.2, 3e-2, 1e-5]

# (filter kwargs, expected kept count on SPECTRUM)
FILTERS = [
    ({"rtol": 0.0, "atol": 1e-12}, 7),  # atol only drops round-off values
    ({}, 6),  # defaults: rtol 1e-3 drops 1e-5 (threshold 1e-2)
    ({"rank": 3}, 3),
    ({"rtol": 0.05}, 4),  # threshold 0.5 sits between 1.0 and 0.2
    ({"atol": 0.5, "rtol": 0.0}, 4),
    ({"damping": 0.3}, 6),
    ({"rank": 5, "rtol": 0.05, "atol": 0.1, "damping": 2.0}, 4),
    ({"rank": 2, "rtol": 0.0, "atol": 0.0, "damping": 1e-3}, 2),
]

SHAPES = [(7, 7), (9, 20), (25, 8)]  # square, N < P, N > P


@pytest.mark.parametrize(("kwargs", "kept"), FILTERS)
def test_filter_inverse_matches_reference(kwargs, kept):
    s = torch.tensor(SPECTRUM, dtype=torch.float64)
    phi, mask = SpectralFilter(**kwargs).inverse(s)
    assert int(mask.sum()) == kept
    torch.testing.assert_close(phi, reference_filter(s, **kwargs), rtol=1e-15, atol=0)


def test_filter_cut_is_strict():
    s = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    # s_i == rtol * s_1 and s_i == atol are dropped (strict inequality)
    assert SpectralFilter(rtol=0.5, atol=0.0).keep(s).tolist() == [True, False, False]
    assert SpectralFilter(rtol=0.0, atol=0.5).keep(s).tolist() == [True, True, False]


def test_filter_all_zero_keeps_nothing():
    s = torch.zeros(4, dtype=torch.float64)
    phi, mask = SpectralFilter(rtol=0.0, atol=0.0).inverse(s)
    assert not mask.any() and torch.equal(phi, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("kwargs", "kept"), FILTERS)
@pytest.mark.parametrize("solver", ["svd", "gram", "normal"])
def test_jacobian_step_matches_reference(shape, kwargs, kept, solver):
    n, p = shape
    spectrum = SPECTRUM[: min(n, p)]
    jac = matrix_with_spectrum(n, p, spectrum, seed=n + p)
    rows = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    filt = SpectralFilter(**kwargs)
    expected, expected_kept, _ = reference_step(jac, rows, **kwargs)
    if solver != "svd":
        # Gram routes drop s_i below their float64 floor sqrt(n eps) s_1 ~ 1e-7 s_1:
        # the 1e-5 value stays resolvable, so the answer is the same.
        assert gram_floor(max(n, p), 10.0) < 1e-5
    step, info = jacobian_step(jac, rows, filt, solver)
    assert info.solver == solver
    assert info.kept == expected_kept
    if len(spectrum) == len(SPECTRUM):
        assert expected_kept == kept
    assert rel_err(step, expected) <= _tolerance(solver, spectrum[: info.kept])


def _tolerance(solver: str, kept_values: list[float]) -> float:
    """1e-10, or the Gram routes' intrinsic accuracy ``eps * (s_1 / s_k)^2``.

    An eigh of J J^T perturbs e_k by ~eps * e_1, so the component along a kept
    direction with small s_k is accurate only to ~eps (s_1 / s_k)^2 relative.
    """
    if solver == "svd" or not kept_values:
        return 1e-10
    cond = kept_values[0] / kept_values[-1]
    return max(1e-10, 100 * torch.finfo(torch.float64).eps * cond**2)


def test_undamped_full_rank_equals_torch_pinv():
    jac = matrix_with_spectrum(12, 30, [5.0, 4.0, 2.0, 1.0, 0.5], seed=1)
    rows = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step, info = jacobian_step(jac, rows, SpectralFilter(rtol=1e-3, atol=0.0), "svd")
    assert info.kept == 5
    assert rel_err(step, reference_pinv_step(jac, rows, rcond=1e-3)) <= 1e-12


def test_gram_coefficients_give_the_step_through_jt():
    jac = matrix_with_spectrum(10, 40, [3.0, 2.0, 1.0, 0.1, 0.05], seed=2)
    rows = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    coeffs, info = gram_coefficients(jac @ jac.T, rows, SpectralFilter(damping=0.01))
    expected, kept, s = reference_step(jac, rows, damping=0.01)
    assert info.kept == kept == 5
    assert rel_err(jac.T @ coeffs, expected) <= 1e-10
    # singular values: all N of the eigh, descending, the nonzero ones equal the SVD's
    assert info.singular_values.shape == (10,)
    assert torch.all(info.singular_values[:-1] >= info.singular_values[1:])
    torch.testing.assert_close(info.singular_values[:5], s[:5], rtol=1e-10, atol=0)


def test_gram_route_drops_values_below_its_floor():
    # s = 1e-9 * s_1 is below sqrt(N eps) s_1 ~ 4e-8 s_1: the Gram route cannot
    # resolve it and must drop it even with rtol = atol = 0; the SVD keeps it.
    jac = matrix_with_spectrum(8, 30, [1.0, 0.5, 1e-9], seed=4)
    rows = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    filt = SpectralFilter(rtol=0.0, atol=1e-12)  # atol drops the SVD's round-off values
    _, gram_info = jacobian_step(jac, rows, filt, "gram")
    _, svd_info = jacobian_step(jac, rows, filt, "svd")
    assert gram_info.kept == 2
    assert svd_info.kept == 3


def test_normal_step_matches_reference_for_tall_jacobian():
    jac = matrix_with_spectrum(50, 6, [4.0, 2.0, 1.0, 0.5, 0.25, 0.125], seed=5)
    rows = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    step, info = normal_step(jac.T @ jac, jac.T @ rows, SpectralFilter(rank=4))
    expected, kept, _ = reference_step(jac, rows, rank=4)
    assert info.kept == kept == 4
    assert rel_err(step, expected) <= 1e-10


def test_float32_input_is_solved_in_float64():
    jac = matrix_with_spectrum(6, 9, [2.0, 1.0, 0.5], seed=6).to(torch.float32)
    rows = torch.randn(6, generator=torch.Generator().manual_seed(6))
    step, _ = svd_step(jac, rows, SpectralFilter())
    assert step.dtype == torch.float64
    expected, _, _ = reference_step(jac.double(), rows.double())
    assert rel_err(step, expected) <= 1e-12


def test_choose_solver_by_shape():
    assert choose_solver(100, 120) == "svd"  # near square
    assert choose_solver(512, 100_000) == "gram"  # N << P
    assert choose_solver(100_000, 300) == "normal"  # N >> P
    assert choose_solver(10, 1000) == "svd"  # tiny: SVD is cheap and floor-free


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="solver"):
        jacobian_step(torch.ones(2, 2), torch.ones(2), SpectralFilter(), "qr")


# ------------------------------------------------- large Gram solves (Cholesky route)
def _wide_problem(spectrum: list[float], n: int = 300, p: int = 420):
    jac = matrix_with_spectrum(n, p, spectrum, seed=3)
    rows = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return jac, rows


def test_full_rank_undamped_gram_solve_takes_cholesky_and_equals_the_reference():
    from torchsven.solve import CHOLESKY_MIN_ROWS

    n = 300
    assert n >= CHOLESKY_MIN_ROWS
    spectrum = torch.logspace(0, -1.5, n, dtype=torch.float64).tolist()  # all above rtol 1e-3
    jac, rows = _wide_problem(spectrum, n)
    coeffs, info = gram_coefficients(jac @ jac.T, rows, SpectralFilter())
    expected, kept, s = reference_step(jac, rows)
    assert info.projections is None and info.factors is None  # no eigenvectors were formed
    assert info.kept == kept == n and info.solver == "gram"
    assert rel_err(jac.T @ coeffs, expected) <= 1e-10
    assert rel_err(info.singular_values, s) <= 1e-10


@pytest.mark.parametrize(
    "kwargs",
    [{"rtol": 0.05}, {"damping": 1e-3}, {"rank": 299}],
    ids=["cut", "damped", "rank-cap"],
)
def test_large_gram_solve_with_a_cut_or_damping_uses_eigenvectors(kwargs):
    n = 300
    spectrum = torch.logspace(0, -1.5, n, dtype=torch.float64).tolist()
    jac, rows = _wide_problem(spectrum, n)
    coeffs, info = gram_coefficients(jac @ jac.T, rows, SpectralFilter(**kwargs))
    expected, kept, _ = reference_step(jac, rows, **kwargs)
    assert info.projections is not None and info.kept == kept
    assert rel_err(jac.T @ coeffs, expected) <= 1e-10


@pytest.mark.parametrize("rows", [7, 256, 301])
def test_symmetric_product_equals_the_plain_product(rows):
    from torchsven.backends.layers import symmetric_product

    mat = torch.randn(rows, 37, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert rel_err(symmetric_product(mat), mat @ mat.T) <= 1e-14
