"""from_losses / from_errors: values, derivatives at 0 (never NaN), bad input."""

from __future__ import annotations

import pytest
import torch

import torchsven


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


LOSSES = torch.tensor([0.0, 1e-3, 0.5, 2.0], dtype=torch.float64)
ERRORS = torch.tensor([[-2.0, -1e-3], [0.0, 0.5]], dtype=torch.float64)


@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_from_losses_value_and_derivative(kappa):
    rows = torchsven.from_losses(LOSSES, kappa)
    torch.testing.assert_close(rows, LOSSES ** (kappa / 2), rtol=1e-15, atol=0)
    grad = _grad(lambda x: torchsven.from_losses(x, kappa), LOSSES)
    positive = LOSSES > 0
    expected = (kappa / 2) * LOSSES[positive] ** (kappa / 2 - 1)
    torch.testing.assert_close(grad[positive], expected, rtol=1e-13, atol=0)
    # at l = 0: the limit where finite (kappa = 2: 1; kappa > 2: 0), else 0
    assert float(grad[0]) == (1.0 if kappa == 2.0 else 0.0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kappa", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_from_errors_value_and_derivative(kappa):
    rows = torchsven.from_errors(ERRORS, kappa)
    assert rows.shape == ERRORS.shape
    torch.testing.assert_close(rows, ERRORS.sign() * ERRORS.abs() ** kappa, rtol=1e-15, atol=0)
    grad = _grad(lambda x: torchsven.from_errors(x, kappa), ERRORS)
    nonzero = ERRORS != 0
    expected = kappa * ERRORS.abs()[nonzero] ** (kappa - 1)
    torch.testing.assert_close(grad[nonzero], expected, rtol=1e-13, atol=0)
    assert float(grad[1, 0]) == (1.0 if kappa == 1.0 else 0.0)
    assert torch.isfinite(grad).all()


def test_second_derivative_at_zero_is_finite():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torchsven.from_errors(x, 1.5).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all()


def test_kappa_two_errors_row_norm_is_squared_errors():
    e = torch.randn(5, dtype=torch.float64)
    rows = torchsven.from_errors(e, 2.0)
    torch.testing.assert_close(rows.abs(), e**2)


@pytest.mark.parametrize("kappa", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_kappa(kappa):
    with pytest.raises(ValueError, match="kappa"):
        torchsven.from_losses(LOSSES, kappa)
    with pytest.raises(ValueError, match="kappa"):
        torchsven.from_errors(ERRORS, kappa)


def test_bad_inputs():
    with pytest.raises(ValueError, match="losses must be >= 0"):
        torchsven.from_losses(torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match="losses must be a 1-D"):
        torchsven.from_losses(torch.ones(2, 2))
    with pytest.raises(ValueError, match="losses must be a 1-D"):
        torchsven.from_losses(torch.tensor(1.0))
    with pytest.raises(TypeError, match="losses must be a tensor"):
        torchsven.from_losses([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        torchsven.from_losses(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="errors must have at least one dimension"):
        torchsven.from_errors(torch.tensor(1.0))
    with pytest.raises(TypeError, match="kappa must be a real number"):
        torchsven.from_errors(ERRORS, "2")


def test_cross_entropy_rows_train_a_classifier():
    torch.manual_seed(0)
    x = torch.randn(24, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2).double()
    opt = torchsven.Sven(model, lr=0.5, damping=0.0)

    def closure():
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        return torchsven.from_losses(losses)

    first = None
    for _ in range(10):
        opt.step(closure)
        first = opt.last_step.loss if first is None else first
    assert opt.last_step.loss < 0.1 * first
