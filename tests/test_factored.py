"""Factored Gram backend: K, the update and the guard against dense float64 twins."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import torchsven
from torchsven.backends import FactoredBackend, GenericBackend, jacobian
from torchsven.errors import SvenFallbackWarning
from torchsven.microbatch import group_rows
from torchsven.solve import SpectralFilter

from .cases import CASES, LAYER_CASES, layer_case, mlp
from .reference import dense_jacobian, flat, reference_step, rel_err

TOL = 1e-10


def _factored(case, backend: FactoredBackend, filt: SpectralFilter | None = None):
    """(K, direction) of the factored backend on a case (two captures: K, then step)."""
    filt = SpectralFilter() if filt is None else filt
    params = case.params()
    with backend.capture(params) as rec:
        out = case.residuals()
    gram = backend.gram_matrix(out.reshape(-1), params, rec, out)
    with backend.capture(params) as rec:
        out = case.residuals()
    direction = backend.direction(out.reshape(-1), params, filt, rec, out)
    return gram, direction


def _check_against_dense(case, ghost="auto"):
    params = case.params()
    gram, direction = _factored(case, FactoredBackend(case.model, ghost=ghost))
    jac, _ = dense_jacobian(case.residuals, params)
    assert rel_err(gram, jac @ jac.T) <= TOL
    # the same filter on the same K through the generic backend's Gram route
    ref = GenericBackend(solver="gram").direction(
        case.residuals().reshape(-1), params, SpectralFilter()
    )
    step = flat(direction.step)
    assert rel_err(step, flat(ref.step)) <= TOL
    assert direction.solution.kept == ref.solution.kept
    assert rel_err(direction.row_change, jac @ step) <= TOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_shared_cases_match_dense(name):
    _check_against_dense(CASES[name]())


@pytest.mark.parametrize("kind", LAYER_CASES)
def test_layer_families_match_dense(kind):
    _check_against_dense(layer_case(kind))


@pytest.mark.parametrize("kind", ["linear-seq", "conv1d", "conv2d", "embedding", "transformer"])
@pytest.mark.parametrize("ghost", [True, False])
def test_ghost_and_materialised_forms_agree(kind, ghost):
    _check_against_dense(layer_case(kind), ghost=ghost)


def test_multi_output_rows_on_a_cnn():
    case = layer_case("conv2d", n=5)
    assert case.targets.shape[1] == 2  # two rows per sample
    _check_against_dense(case)


def test_sven_step_equals_reference_svd_step():
    case = CASES["mlp-wide"]()
    params = case.params()
    jac, rows = dense_jacobian(case.residuals, params)
    expected, kept, _ = reference_step(jac, rows, rtol=1e-3)
    before = flat(params)
    opt = torchsven.Sven(case.model, lr=0.7, backend="factored")
    opt.step(case.residuals)
    assert opt.last_step.backend == "factored" and opt.last_step.kept == kept
    assert rel_err(flat(params) - before, -0.7 * expected) <= TOL


def test_per_group_lr_and_frozen_group_with_model_keyword():
    case = mlp(n=10, width=6)
    model = case.model
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters()), "lr": 0.5},
        {"params": list(model[4].parameters()), "lr": 0.25},
    ]
    trainable = [p for g in groups[1:] for p in g["params"]]
    jac, rows = dense_jacobian(case.residuals, trainable)
    expected, _, _ = reference_step(jac, rows)
    scale = torch.cat(
        [
            torch.full((p.numel(),), 0.5 if i < 2 else 0.25, dtype=torch.float64)
            for i, p in enumerate(trainable)
        ]
    )
    before, frozen = flat(trainable), flat(model[0].parameters())
    opt = torchsven.Sven(groups, model=model)
    opt.step(case.residuals)
    assert opt.last_step.backend == "factored"
    assert torch.equal(flat(model[0].parameters()), frozen)
    assert rel_err(flat(trainable) - before, -scale * expected) <= TOL


def test_unused_module_gets_a_zero_step():
    case = mlp(n=8, width=5)
    model = nn.ModuleDict({"net": case.model, "unused": nn.Linear(2, 2).double()})
    before = flat(model["unused"].parameters())
    opt = torchsven.Sven(model, backend="factored")
    opt.step(lambda: model["net"](case.inputs) - case.targets)
    assert opt.last_step.backend == "factored"
    assert torch.equal(flat(model["unused"].parameters()), before)


def test_float32_model_builds_k_in_float64():
    case64 = layer_case("transformer")
    case32 = layer_case("transformer", dtype=torch.float32)
    k64, _ = _factored(case64, FactoredBackend(case64.model))
    k32, d32 = _factored(case32, FactoredBackend(case32.model))
    assert k32.dtype == torch.float64 and all(s.dtype == torch.float64 for s in d32.step)
    assert rel_err(k32, k64) <= 1e-5


# ------------------------------------------------------------------ the guard
class Sneaky(nn.Module):
    """Calls a Linear and also uses its weight directly: the hooks see only the call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) + 0.5 * x @ self.fc.weight.T)


class Centered(nn.Module):
    """Parameter-free ``h - h.mean(0)``: couples the samples."""

    def forward(self, h):
        return h - h.mean(dim=0)


class SeqFirst(nn.Module):
    """Applies its Linear to a (T, N, d) view with T == N: dim 0 is not the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1).sum(dim=1)


def _pde_closure(model, x):
    def closure():
        xs = x.clone().requires_grad_(True)
        u = model(xs)
        (du,) = torch.autograd.grad(u.sum(), xs, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), xs, create_graph=True)
        return d2u + torch.sin(xs)

    return closure


def _guard_setups():
    torch.manual_seed(0)
    x3 = torch.randn(7, 3, dtype=torch.float64)
    y1 = torch.randn(7, 1, dtype=torch.float64)
    sneaky = Sneaky().double()
    coupled = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Centered(), nn.Linear(4, 1)).double()
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    seq = SeqFirst().double()
    xs = torch.randn(5, 5, 3, dtype=torch.float64)
    ys = torch.randn(5, 2, dtype=torch.float64)
    pinn = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    xp = torch.linspace(0, 1, 9, dtype=torch.float64).unsqueeze(1)
    return {
        "layer-used-twice": (sneaky, lambda: sneaky(x3) - y1, "do not reproduce"),
        "pde-closure": (pinn, _pde_closure(pinn, xp), "do not reproduce"),
        "coupled-samples": (coupled, lambda: coupled(x3) - y1, "random probe"),
        "batchnorm-train": (bn, lambda: bn(x3) - y1, "batch statistics"),
        "not-batch-first": (seq, lambda: seq(xs) - ys, "random probe"),
    }


@pytest.mark.parametrize(
    "name",
    ["layer-used-twice", "pde-closure", "coupled-samples", "batchnorm-train", "not-batch-first"],
)
def test_guard_falls_back_and_equals_generic(name):
    model, closure, reason = _guard_setups()[name]
    opt = torchsven.Sven(model, backend="factored")
    start = flat(model.parameters())
    with pytest.warns(SvenFallbackWarning, match=reason):
        opt.step(closure)
    assert opt.last_step.backend == "generic"
    got = flat(model.parameters()) - start
    twin, twin_closure, _ = _guard_setups()[name]  # same seed: identical model and data
    assert torch.equal(flat(twin.parameters()), start)
    torchsven.Sven(twin, backend="generic").step(twin_closure)
    assert rel_err(got, flat(twin.parameters()) - start) <= TOL


class GatedSneaky(nn.Module):
    """Uses its Linear's weight outside the call too, through a gate (a buffer) that the
    test sets: with the gate at 0 that path is idle, so the first (full) check passes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 1)
        self.register_buffer("gate", torch.zeros(()))

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) + self.gate * (x @ self.fc.weight.T))


def _count_backward_inputs(backend: FactoredBackend) -> list[int]:
    seen: list[int] = []
    original = backend._backward

    def counting(rows, params, weights):
        seen.append(len(params))
        return original(rows, params, weights)

    backend._backward = counting
    return seen


def test_verified_structure_skips_weight_gradients_and_stays_exact():
    case = mlp(n=7, d_in=3, width=5, d_out=1)
    opt = torchsven.Sven(case.model, backend="factored")
    opt.step(case.residuals)  # builds the backend (first step: full check)
    backend = opt.backend
    seen = _count_backward_inputs(backend)
    params = list(case.model.parameters())
    for _ in range(3):
        start = flat(params)
        jac, rows = dense_jacobian(case.residuals, params)
        opt.step(case.residuals)
        assert opt.last_step.backend == "factored"
        step, _, _ = reference_step(jac, rows)
        assert rel_err(start - flat(params), step) <= TOL
    n_biased_weights = 3  # every Linear of the MLP has a bias: its weight is not asked for
    assert seen == [len(params) - n_biased_weights] * 3
    assert backend.probes == 1 and backend.lean_steps == 3


def test_idle_outside_path_is_caught_when_it_starts_to_contribute():
    torch.manual_seed(0)
    model = GatedSneaky().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    opt = torchsven.Sven(model, backend="factored")
    opt.step(lambda: model(x) - y)  # gate 0: exact, verified
    assert opt.last_step.backend == "factored"
    model.gate.fill_(0.5)  # same graph, the weight's second use now contributes
    twin = copy.deepcopy(model)
    start = flat(model.parameters())
    with pytest.warns(SvenFallbackWarning, match="do not reproduce"):
        opt.step(lambda: model(x) - y)
    assert opt.last_step.backend == "generic"
    torchsven.Sven(twin, backend="generic").step(lambda: twin(x) - y)
    got, want = flat(model.parameters()) - start, flat(twin.parameters()) - start
    assert rel_err(got, want) <= TOL


def test_pde_closure_after_plain_steps_is_a_new_structure():
    model, closure, _ = _guard_setups()["pde-closure"]
    x = torch.linspace(0, 1, 9, dtype=torch.float64).unsqueeze(1)
    opt = torchsven.Sven(model, backend="factored")
    for _ in range(2):  # plain rows of the same module calls: factored, verified
        opt.step(lambda: model(x) - torch.sin(x))
        assert opt.last_step.backend == "factored"
    with pytest.warns(SvenFallbackWarning, match="do not reproduce"):
        opt.step(closure)
    assert opt.last_step.backend == "generic"


def test_graph_fingerprint_tells_structures_apart():
    from torchsven.backends.factored import graph_fingerprint

    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(2, 1)
    params = [*a.parameters(), *b.parameters()]
    x = torch.randn(4, 3)
    fp1, uses1 = graph_fingerprint(b(torch.tanh(a(x))).grad_fn, params)
    fp2, _ = graph_fingerprint(b(torch.tanh(a(2 * x))).grad_fn, params)  # other values
    fp3, _ = graph_fingerprint(b(torch.sigmoid(a(x))).grad_fn, params)  # other op
    fp4, uses4 = graph_fingerprint(b(torch.tanh(a(x)) + x[:, :2] @ a.weight[:, :2]).grad_fn, params)
    assert fp1 == fp2 and fp1 != fp3 and fp1 != fp4
    assert uses1 == (1, 1, 1, 1) and uses4[0] == 2
    assert graph_fingerprint(None, params) == ((), (0, 0, 0, 0))


def test_fallback_warns_once_and_is_remembered():
    model, closure, _ = _guard_setups()["coupled-samples"]
    opt = torchsven.Sven(model, backend="factored")
    with pytest.warns(SvenFallbackWarning):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        opt.step(closure)  # same structure: straight to generic, no second warning
    assert opt.last_step.backend == "generic"


def test_probe_runs_on_new_structures_or_always():
    case = layer_case("batchnorm-eval")
    opt = torchsven.Sven(case.model, backend="factored", rtol=1e-2)
    backend = opt.backend
    for _ in range(3):
        opt.step(case.residuals)
    assert backend.probes == 1 and opt.last_step.backend == "factored"
    case.model[1].train()  # batch statistics: coupled, falls back
    with pytest.warns(SvenFallbackWarning, match="batch statistics"):
        opt.step(case.residuals)
    case.model.eval()
    opt.step(case.residuals)
    assert opt.last_step.backend == "factored" and backend.probes == 1
    always = torchsven.Sven(case.model, backend="factored", verify="always", rtol=1e-2)
    for _ in range(3):
        always.step(case.residuals)
    assert always.backend.probes == 3


def test_marked_coupling_module_falls_back():
    case = layer_case("custom")
    backend = FactoredBackend(case.model, coupled=[type(case.model[1])])
    params = case.params()
    with backend.capture(params) as rec:
        out = case.residuals()
    with pytest.raises(torchsven.backends.FallbackRequired, match="marked as coupling"):
        backend.direction(out.reshape(-1), params, SpectralFilter(), rec, out)


def test_scripted_model_falls_back_with_a_clear_message():
    case = mlp(n=6, width=4)
    scripted = torch.jit.script(case.model)
    opt = torchsven.Sven(scripted, backend="auto")
    with pytest.warns(SvenFallbackWarning, match="scripted"):
        opt.step(lambda: scripted(case.inputs) - case.targets)
    assert opt.last_step.backend == "generic"


# ------------------------------------------------------------------ hooks
def _hook_state(model: nn.Module):
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return [
        (n, {k: v for k, v in getattr(m, n, {}).items()}) for m in model.modules() for n in names
    ]


def test_hooks_never_leak():
    case = layer_case("transformer")
    model = case.model
    model.register_forward_hook(lambda *a: None)  # a user hook stays as it is
    before = _hook_state(model)
    attrs = set(vars(model))
    opt = torchsven.Sven(model, backend="factored", rtol=1e-2)
    opt.step(case.residuals)
    assert _hook_state(model) == before

    def failing():
        model(case.inputs)
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert _hook_state(model) == before
    sneaky, closure, _ = _guard_setups()["layer-used-twice"]
    state = _hook_state(sneaky)
    with pytest.warns(SvenFallbackWarning):
        torchsven.Sven(sneaky, backend="factored").step(closure)
    assert _hook_state(sneaky) == state
    assert set(vars(model)) == attrs


def test_backend_choice_and_bad_input():
    case = mlp(n=6, width=4)
    with pytest.raises(ValueError, match="backend='factored' needs the model"):
        torchsven.Sven(case.params(), backend="factored")
    with pytest.raises(ValueError, match="verify"):
        torchsven.Sven(case.model, verify="sometimes")
    with pytest.raises(ValueError, match="microbatch_size"):
        torchsven.Sven(case.model, microbatch_size=0)
    with pytest.raises(TypeError, match="microbatch_size"):
        torchsven.Sven(case.model, microbatch_size=2.0)
    opt = torchsven.Sven(case.params())  # auto without a model: generic
    opt.step(case.residuals)
    assert opt.last_step.backend == "generic"
    opt = torchsven.Sven(case.model)  # auto with the model: factored
    opt.step(case.residuals)
    assert opt.last_step.backend == "factored"


# ------------------------------------------------------------------ micro-batches
def _grouped_reference(case, b):
    """Dense twin of the micro-batch definition: R_g = ||r_g||, J_g = sum_i (r_i/R_g) J_i."""
    params = case.params()
    jac, rows = dense_jacobian(case.residuals, params)
    out = case.residuals().detach()
    per_sample = rows.reshape(out.shape[0], -1)
    n_groups = math.ceil(out.shape[0] / b)
    weights = torch.zeros(n_groups, rows.numel(), dtype=torch.float64)
    group_rows_ref = torch.zeros(n_groups, dtype=torch.float64)
    m = per_sample.shape[1]
    for g in range(n_groups):
        idx = list(range(g * b * m, min((g + 1) * b, out.shape[0]) * m))
        norm = rows[idx].norm()
        group_rows_ref[g] = norm
        if norm > 0:
            weights[g, idx] = rows[idx] / norm
    return weights @ jac, group_rows_ref


@pytest.mark.parametrize("backend", ["factored", "generic"])
@pytest.mark.parametrize("kind", ["mlp", "conv2d", "transformer"])
def test_microbatches_match_the_dense_definition(backend, kind):
    case = mlp(n=11, width=5, d_out=2) if kind == "mlp" else layer_case(kind, n=7)
    b = 3
    jac_g, rows_g = _grouped_reference(case, b)
    assert rel_err(group_rows(case.residuals(), b).detach(), rows_g) <= 1e-14
    expected, kept, _ = reference_step(jac_g, rows_g)
    params = case.params()
    before = flat(params)
    opt = torchsven.Sven(case.model, backend=backend, microbatch_size=b)
    opt.step(case.residuals)
    assert opt.last_step.backend == backend and opt.last_step.rows == rows_g.numel()
    assert opt.last_step.kept == kept
    assert rel_err(flat(params) - before, -expected) <= 1e-9


def test_microbatch_gram_is_pooled_with_cross_terms():
    case = mlp(n=10, width=5)
    b = 4
    backend = FactoredBackend(case.model, microbatch_size=b)
    params = case.params()
    with backend.capture(params) as rec:
        out = case.residuals()
    gram = backend.gram_matrix(group_rows(out, b), params, rec, out)
    jac_g, _ = _grouped_reference(case, b)
    assert gram.shape == (3, 3)
    assert rel_err(gram, jac_g @ jac_g.T) <= TOL


def test_microbatch_group_with_zero_residuals_has_no_nan():
    case = mlp(n=6, width=4)
    case.targets[:3] = case.model(case.inputs[:3]).detach()  # first group solved exactly
    opt = torchsven.Sven(case.model, microbatch_size=3)
    opt.step(case.residuals)
    assert all(torch.isfinite(p).all() for p in case.params())


def test_jacobian_helper_unchanged_for_generic_users():
    case = CASES["mlp-tall"]()
    params = case.params()
    jac = jacobian(case.residuals().reshape(-1), params)
    ref, _ = dense_jacobian(case.residuals, params)
    assert rel_err(jac, ref) <= 1e-14


@pytest.mark.parametrize("globalised", [{"damping": "adaptive"}, {"line_search": True}])
def test_microbatch_with_globalised_steps_matches_generic(globalised):
    """The trial calls compare the objective, which grouping leaves unchanged."""
    case, twin = mlp(n=6, width=4), mlp(n=6, width=4)
    twin.model.load_state_dict(case.model.state_dict())
    fast = torchsven.Sven(case.model, microbatch_size=2, **globalised)
    slow = torchsven.Sven(twin.model, microbatch_size=2, backend="generic", **globalised)
    start = 0.5 * float(case.residuals().detach().square().sum())
    for _ in range(4):
        fast.step(case.residuals)
        slow.step(twin.residuals)
        assert fast.last_step.backend == "factored" and fast.last_step.rows == 3
    assert rel_err(flat(case.params()), flat(twin.params())) <= 1e-10
    assert 0.5 * float(case.residuals().detach().square().sum()) < start
    with pytest.raises(ValueError, match="microbatch_size cannot be combined with process"):
        from torchsven.config import check_compatible, make_config

        check_compatible(make_config(microbatch_size=2), True, distributed=True)


def test_speed_benchmark_writes_json_and_table(tmp_path):
    import json

    from torchsven.bench import speed

    argv = ["--cases", "mlp-w64-n128", "--steps", "1", "--no-memory", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    (result,) = report["results"]
    assert set(result["time_ms"]) == set(speed.METHODS)
    assert {"factored/sgd", "generic/factored", "svd/factored"} <= set(result["ratios"])
    assert "mlp-w64-n128" in (tmp_path / "speed.md").read_text()
    assert speed.main(["--cases", "no-such-case"]) == 2
