"""Options of the paper's method, each against a dense float64 reference of its definition.

References are built from ``tests/reference.py`` (plain autograd loop for J,
``torch.linalg.svd`` and the explicit filter), written out again here for each
option's equation; nothing in torchsven's solve code is reused by a reference.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchsven
from torchsven import masks
from torchsven.backends import BACKENDS
from torchsven.randomized import nystrom_coefficients, randomized_step, randomized_svd
from torchsven.solve import SpectralFilter, gram_coefficients
from torchsven.variable_rank import greedy_prefix, spectral_components

from .cases import Case, mlp
from .reference import dense_jacobian, flat, reference_filter, reference_step, rel_err

TOL = 1e-10


def small_case(seed: int = 0, n: int = 8, width: int = 6) -> Case:
    return mlp(n=n, d_in=3, width=width, seed=seed)


def assert_gap(s: torch.Tensor, threshold: float) -> None:
    """No singular value within a factor 1.5 of the cut: keep/drop is unambiguous."""
    near = (s > threshold / 1.5) & (s < threshold * 1.5)
    assert not bool(near.any()), f"singular values too close to the cut {threshold}: {s}"


def sven_update(opt: torchsven.Sven, case: Case, lr: float) -> torch.Tensor:
    before = flat(case.params())
    opt.step(case.residuals)
    return (before - flat(case.params())) / lr


# ---------------------------------------------------------------- preconditioning
@pytest.mark.parametrize("steps", [1, 3])
def test_precondition_pre_matches_reference(steps):
    case, ref = small_case(1), small_case(1)
    alpha, eps, lr = 0.9, 1e-6, 0.3
    opt = torchsven.Sven(
        case.model,
        lr=lr,
        precondition="pre",
        rmsprop_alpha=alpha,
        rmsprop_eps=eps,
        damping=0.0,
    )
    v = torch.zeros(sum(p.numel() for p in ref.params()), dtype=torch.float64)
    for _ in range(steps):
        jac, r = dense_jacobian(ref.residuals, ref.params())
        g = jac.T @ r / r.numel()
        v = alpha * v + (1 - alpha) * g * g
        d = 1.0 / (v.sqrt() + eps)
        inner, _, s = reference_step(jac * d, r)
        assert_gap(s, 1e-3 * float(s[0]))
        expected = d * inner
        got = sven_update(opt, case, lr)
        assert rel_err(got, expected) < TOL
        with torch.no_grad():
            for p, dp in zip(ref.params(), _split(expected, ref.params()), strict=True):
                p.sub_(lr * dp)
    state_v = torch.cat([opt.state[p]["square_avg"].reshape(-1) for p in case.params()])
    assert rel_err(state_v, v) < TOL


def _split(vec, params):
    out, o = [], 0
    for p in params:
        out.append(vec[o : o + p.numel()].view(p.shape))
        o += p.numel()
    return out


def _reference_run(case: Case, steps: int, lr: float, transform) -> list[torch.Tensor]:
    """Apply ``transform(u, state) -> applied`` to each dense reference step u."""
    applied_all, state = [], {}
    for _ in range(steps):
        jac, r = dense_jacobian(case.residuals, case.params())
        u, _, s = reference_step(jac, r)
        assert_gap(s, 1e-3 * float(s[0]))
        applied = transform(u, state)
        applied_all.append(applied)
        with torch.no_grad():
            for p, dp in zip(case.params(), _split(applied, case.params()), strict=True):
                p.sub_(lr * dp)
    return applied_all


@pytest.mark.parametrize(
    "kw",
    [
        {"precondition": "post"},
        {"momentum": 0.7},
        {"precondition": "post", "momentum": 0.5},
    ],
)
def test_post_and_momentum_match_reference(kw):
    alpha, eps, lr = 0.8, 1e-7, 0.2
    mu = kw.get("momentum", 0.0)
    post = kw.get("precondition") == "post"

    def transform(u, state):
        if post:
            state["v"] = alpha * state.get("v", torch.zeros_like(u)) + (1 - alpha) * u * u
            u = u / (state["v"].sqrt() + eps)
        if mu:
            state["b"] = mu * state.get("b", torch.zeros_like(u)) + u
            u = state["b"]
        return u

    case, ref = small_case(2), small_case(2)
    expected = _reference_run(ref, 3, lr, transform)
    opt = torchsven.Sven(
        case.model, lr=lr, rmsprop_alpha=alpha, rmsprop_eps=eps, backend="generic", **kw
    )
    for e in expected:
        assert rel_err(sven_update(opt, case, lr), e) < TOL
    assert rel_err(flat(case.params()), flat(ref.params())) < TOL


# ----------------------------------------------------------------- variable rank
def test_greedy_prefix_scan():
    values = {1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0}
    calls = []

    def f(m):
        calls.append(m)
        return values[m]

    assert greedy_prefix(f, 4, 6.0) == (2, [6.0, 5.0, 3.0, 4.0])
    assert calls == [1, 2, 3]  # stops at the first value above the best
    assert greedy_prefix(lambda m: 7.0, 4, 6.0) == (0, [6.0, 7.0])
    assert greedy_prefix(lambda m: float("nan"), 3, 6.0)[0] == 0
    assert greedy_prefix(lambda m: 6.0 - m, 3, 6.0) == (3, [6.0, 5.0, 4.0, 3.0])


@pytest.mark.parametrize("solver", ["svd", "gram", "normal"])
def test_spectral_components_sum_to_reference_step(solver):
    case = small_case(3, n=10, width=4)
    jac, r = dense_jacobian(case.residuals, case.params())
    filt = SpectralFilter(rank=6, damping=1e-3)
    comps, sol = spectral_components(jac, r, filt, solver)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    phi = reference_filter(s, rank=6, damping=1e-3)
    expected = (phi * (u.T @ r))[:, None] * vh  # rank-1 components, descending s
    assert comps.shape[0] == sol.kept == int((phi != 0).sum()) == 6
    for i in range(6):  # sign of (u_i, v_i) cancels in each component
        assert rel_err(comps[i], expected[i]) < 1e-9
    assert rel_err(comps.sum(0), reference_step(jac, r, rank=6, damping=1e-3)[0]) < TOL


def test_variable_rank_matches_reference_greedy_scan():
    lr = 1.0
    case, ref = small_case(4, n=10, width=6), small_case(4, n=10, width=6)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return case.residuals()

    jac, r = dense_jacobian(ref.residuals, ref.params())
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    assert_gap(s, 1e-3 * float(s[0]))
    phi = reference_filter(s)
    comps = [(phi[i] * (u[:, i] @ r)) * vh[i] for i in range(int((phi != 0).sum()))]
    theta0 = flat(ref.params())

    def objective(theta):
        m = copy.deepcopy(ref.model)
        torch.nn.utils.vector_to_parameters(theta, m.parameters())
        with torch.no_grad():
            return 0.5 * float((m(ref.inputs) - ref.targets).square().sum())

    best, best_f, evals = 0, 0.5 * float(r.square().sum()), 0
    for m in range(1, len(comps) + 1):
        evals += 1
        f = objective(theta0 - lr * sum(comps[:m]))
        if f > best_f:
            break
        best, best_f = m, f
    assert 0 < best < len(comps), "the case must stop the scan early"
    opt = torchsven.Sven(case.model, lr=lr, variable_rank=True, damping=0.0)
    opt.step(closure)
    assert rel_err(flat(case.params()), theta0 - lr * sum(comps[:best])) < TOL
    info = opt.last_step
    assert info.kept == info.extras["variable_rank"] == best
    assert info.extras["kept_by_filter"] == len(comps)
    assert info.extras["closure_calls"] == calls["n"] == 1 + evals


# ------------------------------------------------------------------------- masks
def test_selection_functions():
    g = torch.Generator().manual_seed(3)
    idx = masks.entry_selection(50, 0.3, g)
    assert idx.numel() == 15 and idx.unique().numel() == 15 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, masks.entry_selection(50, 0.3, torch.Generator().manual_seed(3)))
    assert not torch.equal(idx, masks.entry_selection(50, 0.3, g))  # fresh draw next step
    assert masks.n_selected(10, 1e-6) == 1
    numels = [10, 20, 30, 40]
    chosen = masks.tensor_selection(numels, 0.5, torch.Generator().manual_seed(0))
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    prefix = next(order[:j] for j in range(1, 5) if sum(numels[i] for i in order[:j]) >= 50)
    assert chosen == sorted(prefix)  # the shortest random-order prefix holding half
    counts = torch.zeros(20)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        counts[masks.row_selection(20, 0.25, g)] += 1
    assert counts.sum() == 400 * 5 and counts.min() > 50  # every row drawn, about 100 each


def _masked_reference(case: Case, index: torch.Tensor, rtol: float = 1e-3) -> torch.Tensor:
    jac, r = dense_jacobian(case.residuals, case.params())
    sub, _, s = reference_step(jac[:, index], r, rtol=rtol)
    assert_gap(s, rtol * float(s[0]))
    full = torch.zeros(jac.shape[1], dtype=torch.float64)
    full[index] = sub
    return full


@pytest.mark.parametrize("mask", ["entries", "tensors", "rows"])
def test_masks_match_reference(mask):
    fraction, seed, lr = 0.4, 7, 0.5
    case, ref = small_case(11), small_case(11)
    g = torch.Generator().manual_seed(seed)
    opt = torchsven.Sven(
        case.model,
        lr=lr,
        rtol=1e-6,
        param_fraction=fraction,
        mask=mask,
        seed=seed,
        backend="generic",  # the exact SVD route: 1e-10 at rtol 1e-6 (a Gram route is ~1e-8),
        damping=0.0,
    )
    for _ in range(2):
        sel = masks.select(mask, fraction, ref.params(), ref.model, g)
        assert sel.index is not None
        expected = _masked_reference(ref, sel.index, rtol=1e-6)
        got = sven_update(opt, case, lr)
        assert rel_err(got, expected) < TOL
        assert opt.last_step.extras["selected"] == sel.index.numel()
        with torch.no_grad():
            for p, dp in zip(ref.params(), _split(expected, ref.params()), strict=True):
                p.sub_(lr * dp)
    total = sum(p.numel() for p in case.params())
    if mask == "entries":
        assert sel.index.numel() == round(fraction * total)


def test_row_mask_index_and_layers():
    case = small_case(6)
    params = case.params()
    sel = masks.select("rows", 0.5, params, case.model, torch.Generator().manual_seed(1))
    linears = [m for m in case.model if isinstance(m, nn.Linear)]
    assert [layer.module for layer in sel.row_layers] == linears
    # explicit positions: weight rows then bias entries, per layer, in parameter order
    offsets, o = {}, 0
    for p in params:
        offsets[id(p)] = o
        o += p.numel()
    expected = []
    for layer, rows in zip(sel.row_layers, sel.row_index, strict=True):
        assert rows.numel() == max(1, round(0.5 * layer.weight.shape[0]))
        w, b = layer.weight, layer.bias
        for i in rows.tolist():
            expected.extend(
                range(offsets[id(w)] + i * w.shape[1], offsets[id(w)] + (i + 1) * w.shape[1])
            )
        expected.extend(offsets[id(b)] + i for i in rows.tolist())
    assert sel.index.tolist() == expected
    with sel.hooks():  # same forward values through the leaves
        out = case.model(case.inputs)
    assert torch.allclose(out, case.model(case.inputs), rtol=1e-14, atol=1e-15)
    assert all(not m._forward_hooks for m in case.model.modules())


def test_row_mask_skips_full_weight_gradients_and_leaves_model_alone():
    case = small_case(7)
    fired = []
    for p in case.params():
        p.register_hook(lambda g, p=p: fired.append(p.shape))
    before = {name: set(vars(m)) for name, m in case.model.named_modules()}
    opt = torchsven.Sven(case.model, lr=0.5, param_fraction=0.5, mask="rows", damping=0.0)
    opt.step(case.residuals)
    assert fired == []  # autograd never formed a gradient of a whole user weight
    assert {name: set(vars(m)) for name, m in case.model.named_modules()} == before
    assert all(not m._forward_hooks for m in case.model.modules())


class _TwiceAndKeyword(nn.Module):
    """A layer called twice, a call by keyword, a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(input=torch.tanh(self.inner(h)))


def test_row_mask_layer_called_twice_matches_reference():
    torch.manual_seed(1)
    model = _TwiceAndKeyword().double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    case, ref = Case("twice", model, x, y), Case("twice", copy.deepcopy(model), x, y)
    sel = masks.select("rows", 0.5, ref.params(), ref.model, torch.Generator().manual_seed(4))
    assert len(sel.row_layers) == 2 and sel.row_leaves[1][1] is None  # frozen bias: constant
    expected = _masked_reference(ref, sel.index, rtol=1e-6)
    opt = torchsven.Sven(
        model, lr=1.0, rtol=1e-6, param_fraction=0.5, mask="rows", seed=4, damping=0.0
    )
    assert rel_err(sven_update(opt, case, 1.0), expected) < TOL


def test_row_mask_conv_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)).double()
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    case = Case("conv1d", model, x, y)
    ref = Case("conv1d", copy.deepcopy(model), x, y)
    sel = masks.select("rows", 0.5, ref.params(), ref.model, torch.Generator().manual_seed(2))
    assert [type(layer.module) for layer in sel.row_layers] == [nn.Conv1d, nn.Linear]
    expected = _masked_reference(ref, sel.index)
    opt = torchsven.Sven(model, lr=1.0, param_fraction=0.5, mask="rows", seed=2, damping=0.0)
    assert rel_err(sven_update(opt, case, 1.0), expected) < TOL


# -------------------------------------------------------------------- randomized
def _low_rank(n, p, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    b = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -1, k, dtype=torch.float64)
    return a @ torch.diag(s) @ b.T, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("n", "p"), [(12, 30), (30, 12)])
def test_randomized_full_rank_equals_exact(n, p):
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(n, p, generator=g, dtype=torch.float64)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    k = min(n, p)
    for oversample, power in [(0, 0), (5, 2)]:
        step, sol = randomized_step(
            jac, r, SpectralFilter(rank=k), oversample, power, torch.Generator().manual_seed(1)
        )
        expected, kept, s = reference_step(jac, r, rank=k)
        assert rel_err(step, expected) < TOL and sol.kept == kept
        assert rel_err(sol.singular_values, s) < TOL


def test_randomized_truncated_on_exact_low_rank():
    jac, r = _low_rank(40, 25, 6)
    u, s, vh = randomized_svd(jac, 6, 4, 1, torch.Generator().manual_seed(0))
    assert rel_err(s[:6], torch.logspace(0, -1, 6, dtype=torch.float64)) < TOL
    assert rel_err(u[:, :6] @ torch.diag(s[:6]) @ vh[:6], jac) < TOL
    step, _ = randomized_step(
        jac, r, SpectralFilter(rank=6), 4, 1, torch.Generator().manual_seed(0)
    )
    assert rel_err(step, reference_step(jac, r, rank=6)[0]) < TOL
    # seeded: same seed same sketch; a dense matrix at low rank depends on the seed
    dense = torch.randn(30, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = randomized_svd(dense, 3, 2, 0, torch.Generator().manual_seed(1))[1]
    b = randomized_svd(dense, 3, 2, 0, torch.Generator().manual_seed(1))[1]
    c = randomized_svd(dense, 3, 2, 0, torch.Generator().manual_seed(2))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nystrom_equals_exact_gram_solve():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(15, 40, generator=g, dtype=torch.float64)
    r = torch.randn(15, generator=g, dtype=torch.float64)
    gram = jac @ jac.T
    filt = SpectralFilter(rank=15, damping=1e-2)
    c_exact, sol_exact = gram_coefficients(gram, r, filt)
    for operand in (gram, lambda v: gram @ v):
        c, sol = nystrom_coefficients(operand, r, filt, 3, 1, torch.Generator().manual_seed(0))
        assert rel_err(c, c_exact) < TOL and sol.kept == sol_exact.kept
        assert rel_err(jac.T @ c, reference_step(jac, r, rank=15, damping=1e-2)[0]) < TOL
    low, r_low = _low_rank(30, 30, 5)
    c, sol = nystrom_coefficients(
        low @ low.T, r_low, SpectralFilter(rank=5), 3, 1, torch.Generator().manual_seed(3)
    )
    assert sol.kept == 5
    assert rel_err(low.T @ c, reference_step(low, r_low, rank=5)[0]) < TOL


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
@pytest.mark.parametrize(("rank", "oversample"), [(8, 0), (5, 3)])
def test_randomized_sven_full_sketch_equals_exact(backend, rank, oversample):
    """Generic: randomized SVD of J; a Gram backend (factored): Nystrom on its K."""
    case, ref = small_case(8), small_case(8)  # N = 8 rows: the sketch holds all of them
    jac, r = dense_jacobian(ref.residuals, ref.params())
    expected, _, _ = reference_step(jac, r, rank=rank)
    opt = torchsven.Sven(
        case.model,
        lr=1.0,
        rank=rank,
        randomized=True,
        oversample=oversample,
        power_iters=1,
        backend=backend,
        damping=0.0,
    )
    assert rel_err(sven_update(opt, case, 1.0), expected) < TOL
    assert opt.last_step.backend == backend and opt.last_step.kept == rank
    assert opt.last_step.solver == ("randomized" if backend == "generic" else "matfree")


# ---------------------------------------------------------------------- spectrum
def test_effective_rank_definition():
    assert torchsven.effective_rank(torch.tensor([3.0, 0.0])) == pytest.approx(1.0)
    assert torchsven.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    assert torchsven.effective_rank(s) == pytest.approx(
        float(torch.exp(-(p * p.log()).sum())), rel=1e-14
    )
    assert torchsven.effective_rank(torch.zeros(3)) == 0.0


def test_spectrum_history_and_plot(tmp_path):
    case = small_case(9)
    opt = torchsven.Sven(case.model, lr=0.3, spectrum_every=3, damping=0.0)
    seen = []
    for _ in range(7):
        opt.step(case.residuals)
        seen.append(opt.last_step)
    hist = opt.spectrum_history
    assert [h.step for h in hist] == [0, 3, 6]
    for h in hist:
        assert torch.equal(h.singular_values, seen[h.step].singular_values)
        assert h.kept == seen[h.step].kept and h.loss == seen[h.step].loss
        assert h.effective_rank == torchsven.effective_rank(h.singular_values)
    fig = torchsven.plot_spectrum(opt, path=str(tmp_path / "spectrum.png"))
    assert (tmp_path / "spectrum.png").stat().st_size > 1000
    axes = {ax.get_title() or ax.get_ylabel(): ax for ax in fig.axes}
    assert set(axes) == {"spectrum over training", "directions", "step"}  # "step": colour bar
    assert len(axes["spectrum over training"].lines) == 3
    assert len(axes["directions"].lines) == 2
    with pytest.raises(ValueError, match="spectrum_every"):
        torchsven.plot_spectrum([])


# ------------------------------------------------------------- state and resume
RESUME_OPTIONS = [
    {"precondition": "pre", "param_fraction": 0.5, "mask": "rows", "spectrum_every": 2},
    {"precondition": "post", "momentum": 0.5, "param_fraction": 0.6, "mask": "entries"},
    {
        "variable_rank": True,
        "randomized": True,
        "rank": 6,
        "param_fraction": 0.5,
        "mask": "tensors",
    },
]


@pytest.mark.parametrize("kw", RESUME_OPTIONS)
def test_resume_is_bit_for_bit(kw):
    full, half = small_case(10), small_case(10)
    opt = torchsven.Sven(full.model, lr=0.3, **kw)
    for _ in range(6):
        opt.step(full.residuals)
    opt_a = torchsven.Sven(half.model, lr=0.3, **kw)
    for _ in range(3):
        opt_a.step(half.residuals)
    saved = copy.deepcopy(opt_a.state_dict())
    opt_b = torchsven.Sven(half.model, lr=0.3, **{**kw, "seed": 99})  # seed from the state
    opt_b.load_state_dict(saved)
    for _ in range(3):
        opt_b.step(half.residuals)
    assert torch.equal(flat(full.params()), flat(half.params()))
    assert opt.state_dict()["sven"] == opt_b.state_dict()["sven"]  # history and generator too


# -------------------------------------------------------------- combinations
def _teacher_case(seed=0) -> Case:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x) + 0.3 * torch.sin(3 * x[:, :1])
    student = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    return Case("teacher", student, x, y)


def allowed_combinations():
    for pre, mom, vr, mask, rnd in itertools.product(
        [None, "pre", "post"],
        [0.0, 0.5],
        [False, True],
        [None, "entries", "tensors", "rows"],
        [False, True],
    ):  # 80 combinations
        if vr and (pre == "post" or mom > 0):
            continue
        kw = {"precondition": pre, "momentum": mom, "variable_rank": vr, "randomized": rnd}
        if mask is not None:
            kw.update(param_fraction=0.6, mask=mask)
        if rnd:  # rank 6 of N = 10 rows: a true truncation; the sketch (10 columns) is full
            kw.update(rank=6, power_iters=0)
        yield kw


@pytest.mark.parametrize("kw", list(allowed_combinations()), ids=str)
def test_allowed_combination_decreases_objective(kw):
    case = _teacher_case()
    # "post" divides the update by its RMS: entries of size ~1/sqrt(1 - alpha) at first
    lr = 0.01 if kw["precondition"] == "post" else 0.1
    opt = torchsven.Sven(case.model, lr=lr, damping=1e-4, **kw)
    start = 0.5 * float(case.residuals().detach().square().sum())
    for _ in range(12):
        opt.step(case.residuals)
    end = 0.5 * float(case.residuals().detach().square().sum())
    assert end < 0.5 * start


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"precondition": "adam"}, ValueError, "precondition must be None, 'pre' or 'post'"),
        ({"rmsprop_alpha": 1.0}, ValueError, r"rmsprop_alpha must be a number in \[0, 1\)"),
        ({"rmsprop_alpha": "0.9"}, TypeError, "rmsprop_alpha must be"),
        ({"rmsprop_eps": 0.0}, ValueError, "rmsprop_eps must be a finite number > 0"),
        ({"momentum": -0.1}, ValueError, r"momentum must be a number in \[0, 1\)"),
        ({"momentum": float("nan")}, ValueError, "momentum must be"),
        ({"variable_rank": 1}, TypeError, "variable_rank must be a bool"),
        ({"param_fraction": 0.0}, ValueError, r"param_fraction must be a number in \(0, 1\]"),
        ({"param_fraction": 1.5}, ValueError, "param_fraction must be"),
        ({"mask": "blocks"}, ValueError, r"mask must be one of \['entries', 'tensors', 'rows'\]"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"seed": 1.0}, TypeError, "seed must be an int"),
        ({"randomized": "yes"}, TypeError, "randomized must be a bool"),
        ({"randomized": True, "rank": 4, "oversample": -1}, ValueError, "oversample must be"),
        ({"randomized": True, "rank": 4, "power_iters": 1.5}, TypeError, "power_iters must be"),
        ({"spectrum_every": 0}, ValueError, "spectrum_every must be None or an int >= 1"),
        ({"randomized": True}, ValueError, "randomized=True needs rank=k"),
        ({"variable_rank": True, "momentum": 0.5}, ValueError, "variable_rank=True cannot"),
        ({"variable_rank": True, "precondition": "post"}, ValueError, "variable_rank=True cannot"),
    ],
)
def test_invalid_options_raise(kw, error, match):
    case = small_case()
    with pytest.raises(error, match=match):
        torchsven.Sven(case.model, **kw)


def test_invalid_combinations_with_model_and_groups():
    case = small_case()
    with pytest.raises(ValueError, match="mask='rows' needs the model"):
        torchsven.Sven(case.params(), param_fraction=0.5, mask="rows", damping=0.0)
    torchsven.Sven(case.params(), model=case.model, param_fraction=0.5, mask="rows", damping=0.0)
    with pytest.raises(ValueError, match="param group sets 'momentum'"):
        torchsven.Sven([{"params": case.params(), "momentum": 0.9}], damping=0.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"variable_rank": True, "param_fraction": 0.5, "mask": "rows"},
        {"momentum": 0.5, "precondition": "pre", "param_fraction": 0.5, "mask": "entries"},
    ],
)
def test_failed_step_changes_nothing(kw):
    case = small_case(12)
    opt = torchsven.Sven(case.model, lr=0.5, **kw)
    opt.step(case.residuals)
    snapshot = (flat(case.params()), copy.deepcopy(opt.state_dict()), opt.last_step)
    calls = {"n": 0}

    def failing():  # variable rank: raises in an evaluation; otherwise NaN rows
        calls["n"] += 1
        if kw.get("variable_rank"):
            if calls["n"] == 2:
                raise RuntimeError("closure failed")
            return case.residuals()
        return case.residuals() * float("nan")

    with pytest.raises((torchsven.NonFiniteError, RuntimeError)):
        opt.step(failing)
    assert calls["n"] == (2 if kw.get("variable_rank") else 1)
    assert torch.equal(flat(case.params()), snapshot[0])
    assert opt.last_step is snapshot[2]
    state = opt.state_dict()
    assert state["sven"]["variants"] == snapshot[1]["sven"]["variants"]
    for key, value in snapshot[1]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(state["state"][key][name], tensor)
    assert all(not m._forward_hooks for m in case.model.modules())
    opt.step(case.residuals)  # and it goes on from there


def test_options_inactive_by_default_match_plain_step():
    case, ref = small_case(13), small_case(13)
    plain = torchsven.Sven(case.model, lr=0.4, damping=0.0)
    seeded = torchsven.Sven(ref.model, lr=0.4, seed=5, param_fraction=1.0, mask="rows", damping=0.0)
    for _ in range(2):
        plain.step(case.residuals)
        seeded.step(ref.residuals)
    assert torch.equal(flat(case.params()), flat(ref.params()))


def test_variable_rank_rejects_non_finite_prefix():
    case = small_case(14)
    calls = {"n": 0}

    def closure():  # the objective is NaN after the second component
        calls["n"] += 1
        out = case.residuals()
        return out * float("nan") if calls["n"] == 3 else out

    opt = torchsven.Sven(case.model, lr=0.1, variable_rank=True, damping=0.0)
    opt.step(closure)
    assert opt.last_step.extras["variable_rank"] == 1
    assert opt.last_step.extras["closure_calls"] == calls["n"] == 3


def test_globalized_steps_combine_with_direction_options_only():
    case = small_case(15)
    with pytest.raises(ValueError, match="cannot be combined with damping='adaptive' or line_"):
        torchsven.Sven(case.model, damping="adaptive", momentum=0.5)
    with pytest.raises(ValueError, match="cannot be combined with on_nonfinite='skip'"):
        torchsven.Sven(case.model, on_nonfinite="skip", variable_rank=True, damping=0.0)
    with pytest.raises(ValueError, match="precondition='post', momentum and variable_rank"):
        torchsven.Sven(case.model, line_search="backtracking", precondition="post", damping=0.0)
    from torchsven.config import check_compatible, make_config

    with pytest.raises(ValueError, match=r"cannot be combined with process_group"):
        check_compatible(make_config(param_fraction=0.5), True, distributed=True)
    check_compatible(make_config(spectrum_every=3), True, distributed=True)
    check_compatible(make_config(rank=4, randomized=True), True, distributed=True)

    opt = torchsven.Sven(case.model, damping="adaptive", spectrum_every=2)
    for _ in range(3):
        opt.step(case.residuals)
    assert [h.step for h in opt.spectrum_history] == [0, 2]
    assert opt.spectrum_history[-1].loss == opt.last_step.loss


@pytest.mark.parametrize(
    "kw",
    [
        {"damping": "adaptive", "param_fraction": 0.5, "mask": "rows", "precondition": "pre"},
        {"line_search": "backtracking", "param_fraction": 0.5, "mask": "entries"},
        {
            "damping": "adaptive",
            "randomized": True,
            "rank": 6,
            "param_fraction": 0.6,
            "mask": "tensors",
        },
    ],
)
def test_direction_options_under_globalized_steps(kw):
    case = _teacher_case(1)
    opt = torchsven.Sven(case.model, lr=1.0, **kw)
    start = 0.5 * float(case.residuals().detach().square().sum())
    for _ in range(3):
        before = flat(case.params())
        opt.step(case.residuals)
        moved = (flat(case.params()) != before).sum()
        assert int(moved) < before.numel()  # only the selected entries move (if any)
    for _ in range(9):
        opt.step(case.residuals)
    assert 0.5 * float(case.residuals().detach().square().sum()) < 0.5 * start
    if kw.get("precondition") == "pre":
        assert all("square_avg" in opt.state[p] for p in case.params())
    state = copy.deepcopy(opt.state_dict())  # resumable under the globalized step too
    twin = _teacher_case(1)
    twin.model.load_state_dict(case.model.state_dict())
    opt2 = torchsven.Sven(twin.model, lr=1.0, **kw)
    opt2.load_state_dict(state)
    opt.step(case.residuals)
    opt2.step(twin.residuals)
    assert torch.equal(flat(case.params()), flat(twin.params()))


def test_globalized_step_that_raises_rolls_back_the_generator():
    case = small_case(16)
    opt = torchsven.Sven(case.model, damping="adaptive", param_fraction=0.5, mask="entries")
    opt.step(case.residuals)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError):
        opt.step(lambda: None)
    assert opt.state_dict()["sven"]["variants"] == saved["sven"]["variants"]


def test_docs_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "readme" / "options.md").read_text()
    block = text.split("<!-- options-example:start -->")[1].split("<!-- options-example:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    scope: dict = {}
    exec(compile(code, "options.md", "exec"), scope)
    opt = scope["opt"]
    assert opt.last_step.loss < 0.05 * 0.5 * float(scope["y"].square().sum())
    assert [h.step for h in opt.spectrum_history] == [0, 5, 10, 15, 20, 25]


@settings(max_examples=25)
@given(
    total=st.integers(1, 200),
    fraction=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31),
    numels=st.lists(st.integers(1, 50), min_size=1, max_size=8),
)
def test_selection_properties(total, fraction, seed, numels):
    g = torch.Generator().manual_seed(seed)
    idx = masks.entry_selection(total, fraction, g)
    assert idx.numel() == min(total, max(1, round(fraction * total)))
    assert idx.unique().numel() == idx.numel() and bool((idx >= 0).all() & (idx < total).all())
    chosen = masks.tensor_selection(numels, fraction, g)
    assert (
        chosen == sorted(set(chosen))
        and sum(numels[i] for i in chosen) >= fraction * sum(numels) - 1e-9
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_backend_independent_options_match_reference(backend):
    """Tensor masks, "post" and momentum run on every backend (the factored one too)."""
    fraction, seed, lr, mu, alpha, eps = 0.5, 3, 0.3, 0.6, 0.9, 1e-7
    case, ref = small_case(17), small_case(17)
    kw = {
        "param_fraction": fraction,
        "mask": "tensors",
        "seed": seed,
        "momentum": mu,
        "precondition": "post",
        "rmsprop_alpha": alpha,
        "rmsprop_eps": eps,
    }
    opt = torchsven.Sven(case.model, lr=lr, rtol=1e-6, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    v = b = torch.zeros(sum(p.numel() for p in ref.params()), dtype=torch.float64)
    for _ in range(2):
        sel = masks.select("tensors", fraction, ref.params(), ref.model, g)
        u = _masked_reference(ref, sel.index, rtol=1e-6)
        v = alpha * v + (1 - alpha) * u * u
        b = mu * b + u / (v.sqrt() + eps)
        assert rel_err(sven_update(opt, case, lr), b) < 1e-9
        with torch.no_grad():
            for p, dp in zip(ref.params(), _split(b, ref.params()), strict=True):
                p.sub_(lr * dp)
    for other in BACKENDS:  # options that need the generic backend refuse the others
        if other not in ("auto", "generic"):
            with pytest.raises(ValueError, match=f"backend='{other}' cannot be combined"):
                torchsven.Sven(
                    case.model, backend=other, param_fraction=0.5, mask="entries", damping=0.0
                )


def test_precondition_pre_with_mask_matches_reference():
    """``v`` moves only on the selected entries; the step is ``d (J_S diag(d_S))^+ r``."""
    alpha, eps, lr, fraction, seed = 0.5, 1e-6, 0.3, 0.5, 2
    case, ref = small_case(18), small_case(18)
    opt = torchsven.Sven(
        case.model,
        lr=lr,
        rtol=1e-6,
        precondition="pre",
        rmsprop_alpha=alpha,
        rmsprop_eps=eps,
        param_fraction=fraction,
        mask="entries",
        seed=seed,
        damping=0.0,
    )
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(sum(p.numel() for p in ref.params()), dtype=torch.float64)
    for _ in range(3):
        index = masks.select("entries", fraction, ref.params(), ref.model, g).index
        jac, r = dense_jacobian(ref.residuals, ref.params())
        js = jac[:, index]
        v[index] = alpha * v[index] + (1 - alpha) * (js.T @ r / r.numel()) ** 2
        d = 1.0 / (v[index].sqrt() + eps)
        inner, _, s = reference_step(js * d, r, rtol=1e-6)
        assert_gap(s, 1e-6 * float(s[0]))
        expected = torch.zeros_like(v)
        expected[index] = d * inner
        assert rel_err(sven_update(opt, case, lr), expected) < TOL
        with torch.no_grad():
            for p, dp in zip(ref.params(), _split(expected, ref.params()), strict=True):
                p.sub_(lr * dp)
    state_v = torch.cat([opt.state[p]["square_avg"].reshape(-1) for p in case.params()])
    assert torch.equal(state_v == 0, v == 0) and rel_err(state_v, v) < TOL


class _Center(nn.Module):
    def forward(self, x):
        return x - x.mean(0)  # couples the samples: the factored K would be wrong


def test_randomized_falls_back_to_generic_when_the_gram_backend_cannot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), _Center(), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    case, ref = Case("coupled", model, x, y), Case("coupled", copy.deepcopy(model), x, y)
    jac, r = dense_jacobian(ref.residuals, ref.params())
    expected, _, _ = reference_step(jac, r, rank=8)
    opt = torchsven.Sven(model, lr=1.0, rank=8, randomized=True, oversample=0, damping=0.0)
    with pytest.warns(torchsven.SvenFallbackWarning):
        got = sven_update(opt, case, 1.0)
    assert opt.last_step.backend == "generic" and opt.last_step.solver == "randomized"
    assert rel_err(got, expected) < TOL
