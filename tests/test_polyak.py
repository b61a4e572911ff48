"""PolyakSGD: the Polyak step size against its definition, written out here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchsven


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    return model, x, y


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).square().mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(("f_star", "max_lr"), [(0.0, 10.0), (0.1, 10.0), (0.0, 0.05)])
def test_step_matches_definition(f_star, max_lr):
    model, x, y = _problem()
    ref = copy.deepcopy(model)
    opt = torchsven.PolyakSGD(model.parameters(), f_star=f_star, max_lr=max_lr, eps=1e-8)
    for _ in range(3):
        loss = 0.5 * (ref(x) - y).square().mean()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        sq = sum(float(g.square().sum()) for g in grads)
        eta = max(0.0, (float(loss.detach()) - f_star) / (sq + 1e-8))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads, strict=True):
                p -= min(eta, max_lr) * g
        returned = opt.step(_closure(opt, model, x, y))
        assert float(returned.detach()) == pytest.approx(float(loss.detach()), rel=1e-14)
        assert opt.last_step_size == pytest.approx(eta, rel=1e-12)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_groups_share_one_step_size_with_own_caps():
    model, x, y = _problem(1)
    first, last = model[0], model[2]
    opt = torchsven.PolyakSGD(
        [{"params": first.parameters()}, {"params": last.parameters(), "max_lr": 1e-3}],
        max_lr=100.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    eta = opt.last_step_size
    assert 1e-3 < eta < 100.0
    grads = [p.grad for p in model.parameters()]
    lrs = [eta, eta, 1e-3, 1e-3]
    for p, b, g, lr in zip(model.parameters(), before, grads, lrs, strict=True):
        torch.testing.assert_close(p.detach(), b - lr * g, rtol=1e-13, atol=1e-15)


def test_no_step_below_f_star_and_decreases():
    model, x, y = _problem(2)
    opt = torchsven.PolyakSGD(model.parameters(), f_star=1e6)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    assert opt.last_step_size == 0.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with torch.no_grad():  # a realisable target: f_star = 0 is right
        y = _problem(3)[0](x)
    opt = torchsven.PolyakSGD(model.parameters(), f_star=0.0, max_lr=10.0)
    closure = _closure(opt, model, x, y)
    start = float(closure().detach())
    for _ in range(50):
        opt.step(closure)
    assert float(closure().detach()) < 0.2 * start


def test_bad_input_and_state_dict():
    model, x, y = _problem()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="max_lr must be a finite number > 0"):
        torchsven.PolyakSGD(params, max_lr=0.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        torchsven.PolyakSGD(params, eps=-1.0)
    with pytest.raises(TypeError, match="f_star must be a real number"):
        torchsven.PolyakSGD(params, f_star="0")
    with pytest.raises(ValueError, match="param group sets 'f_star'"):
        torchsven.PolyakSGD([{"params": params, "f_star": 1.0}])
    opt = torchsven.PolyakSGD(params, f_star=0.01)
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match="one-element tensor"):
        opt.step(lambda: (model(x) - y).square())
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"must call loss\.backward"):
        opt.step(lambda: (model(x) - y).square().mean())
    other = torchsven.PolyakSGD(params, f_star=5.0, eps=1.0)
    other.load_state_dict(opt.state_dict())
    assert (other.f_star, other.eps) == (0.01, 1e-8)
