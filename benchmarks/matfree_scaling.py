"""Scaling of rank-k Sven steps with the number of rows N (CPU, float32, 2 threads).

Usage: PYTHONPATH=src python benchmarks/matfree_scaling.py [--quick] [--only lm] [--out PREFIX]

Model: MLP 32-256-256-1 (tanh, float32, P = 74,497), N rows = N samples of
random data. Each configuration runs in its own process (fresh memory
accounting); time per step is the median over the timed steps after a first
(warm-up, coupling-probe) step; memory is the peak resident size above the
resident size just before the first step (``ru_maxrss``, so it includes the
step's transient buffers). Methods:

* ``sgd``: ``torch.optim.SGD`` on ``0.5 ||r||^2`` (forward + backward + update);
* ``exact``: ``Sven(model, rank=64)``, factored backend, the N x N Gram matrix
  and its eigh (float64);
* ``matfree-q0`` / ``matfree-q1``: ``Sven(model, rank=64, randomized=True,
  power_iters=q)``: K only through block products from the per-layer factors
  (:mod:`torchsven.matfree`), oversample 10 (l = 74 columns).

A quality table at N = 1024 gives the linearised decrease of ``0.5 ||r||^2`` of
the matrix-free rank-64 step relative to the exact rank-64 step (three seeds
of the sketch), and a tiny GPT-2 (transformers, built from a config: vocab 64,
width 64, 2 layers, 4 heads, T = 64, B = 256: N = 16384 per-token rows, float32)
takes matrix-free rank-64 steps on the factored backend
(``Sven(model, rank=64, randomized=True, power_iters=0, damping="adaptive")``)
beside an AdamW step on the same batch. Ratios are taken within one run; the
machine load (``uptime``) is recorded with them. ``--only lm`` runs the GPT-2
part alone (into ``PREFIX_lm.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import torchsven

RANK = 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mlp(n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)
    )
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 32, generator=g), torch.randn(n, 1, generator=g)


def _timed(step: Callable[[], None], timed: int) -> dict:
    """``{"seconds": median of `timed` steps after a first one, "peak_mb": peak resident
    size above the size before the first step}``."""
    start = _rss_mb()
    step()
    times = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "peak_mb": _peak_mb() - start}


def _one(method: str, n: int, timed: int) -> dict:
    """One configuration in this process: seconds per step and peak MB above the start."""
    model, x, y = _mlp(n)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            loss = 0.5 * (model(x) - y).square().sum()
            loss.backward()
            opt.step()
    else:
        kwargs: dict = {"rank": RANK, "damping": 0.0}  # the plain step
        if method.startswith("matfree"):
            kwargs.update(randomized=True, power_iters=int(method[-1]), oversample=10)
        sven = torchsven.Sven(model, lr=1e-3, **kwargs)

        def step() -> None:
            sven.step(lambda: model(x) - y)

    out = _timed(step, timed)
    if method != "sgd":
        info = sven.last_step
        out.update(solver=info.solver, kept=info.kept, extras=dict(info.extras))
    return out


def _decrease_ratio(
    n: int, power_iters: int, seed: int, problem: int = 0, oversample: int = 10
) -> float:
    """Linearised decrease of the matrix-free rank-64 step / the exact rank-64 step's
    (sketch seed ``seed``, model and data of ``_mlp(n, problem)``)."""
    from torch.func import functional_call, jvp

    from torchsven.backends.factored import FactoredBackend

    model, x, y = _mlp(n, problem)
    params = list(model.parameters())
    backend = FactoredBackend(model)
    with backend.capture(params) as captured, torch.enable_grad():
        out = model(x) - y
    gram = backend.gram_matrix(out.reshape(-1), params, captured, out)
    _, vecs = torch.linalg.eigh(gram)
    r = out.detach().reshape(-1).double()
    exact = 0.5 * float(((vecs.flip(1)[:, :RANK].T @ r) ** 2).sum())
    before = [p.detach().clone() for p in params]
    sven = torchsven.Sven(
        model,
        lr=1.0,
        rank=RANK,
        randomized=True,
        power_iters=power_iters,
        oversample=oversample,
        rtol=1e-6,
        seed=seed,
        damping=0.0,
    )
    sven.step(lambda: model(x) - y)
    names = [name for name, _ in model.named_parameters()]
    m64 = model.double()
    primal = {k: b.double() for k, b in zip(names, before, strict=True)}
    tangent = {
        k: (b.double() - p.detach().double())
        for k, b, p in zip(names, before, m64.parameters(), strict=True)
    }
    _, jh = jvp(
        lambda ps: functional_call(m64, ps, (x.double(),)).reshape(-1), (primal,), (tangent,)
    )
    return float(r @ jh - 0.5 * jh @ jh) / exact


VOCAB = 64


def _gpt2(seq: int) -> nn.Module:
    """Tiny GPT-2 built from a config in code (no download): vocab 64, width 64, 2 layers,
    4 heads, tied head, dropout off, float32."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _tokens(batch: int, seq: int) -> torch.Tensor:
    """(batch, seq + 1) sequences ``x_{t+1} = 5 x_t + 3 mod 64`` with 10% random tokens,
    so that there is something to learn (a noisy bigram rule)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.empty(batch, seq + 1, dtype=torch.long)
    idx[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
    for t in range(seq):
        idx[:, t + 1] = (5 * idx[:, t] + 3) % VOCAB
    noise = torch.rand(batch, seq + 1, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (batch, seq + 1), generator=g), idx)


def _lm(batch: int, seq: int, timed: int, method: str) -> dict:
    """Tiny GPT-2, per-token rows (batch, seq): N = batch x seq rows, seq per sequence."""
    model = _gpt2(seq)
    idx = _tokens(batch, seq)
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def losses() -> torch.Tensor:  # (batch, seq) next-token cross-entropy
        logits = model(input_ids=inputs).logits
        out = nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none"
        )
        return out.reshape(batch, seq)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(losses().mean())

    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            losses().mean().backward()
            opt.step()
    else:
        sven = torchsven.Sven(
            model, lr=0.5, rank=RANK, randomized=True, power_iters=0, damping="adaptive"
        )

        def step() -> None:
            sven.step(lambda: torchsven.from_losses(losses().reshape(-1)).reshape(batch, seq))

    first = mean_loss()
    out = {
        **_timed(step, timed),
        "rows": batch * seq,
        "seq": seq,
        "steps": 1 + timed,
        "params": sum(p.numel() for p in model.parameters()),
        "first_mean_loss": first,
        "last_mean_loss": mean_loss(),
    }
    if method != "adamw":
        info = sven.last_step
        out.update(solver=info.solver, backend=info.backend, extras=dict(info.extras))
        if info.backend != "factored":
            raise RuntimeError(f"the GPT-2 step ran on the {info.backend} backend")
    return out


def _spawn(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    command = [sys.executable, __file__, "--threads", str(THREADS), "--one", *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


THREADS = 2
#: model/data seeds of the quality table (three sketch seeds each)
QUALITY_PROBLEMS = (0, 1, 2)
#: (power_iters, oversample) of the quality table; key "q{q}" for oversample 10
QUALITY_CONFIGS = ((0, 10), (1, 10), (2, 10), (0, 0), (1, 0))


def _load() -> str:
    return os.getloadavg().__repr__()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/matfree_scaling")
    parser.add_argument("--one", nargs="+")
    parser.add_argument("--exact-max", type=int, default=8192)
    parser.add_argument("--q1-max", type=int, default=32768)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument(
        "--only",
        choices=["lm", "quality"],
        default=None,
        help="run one part alone (lm: into PREFIX_lm.json; quality: into PREFIX.json)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per process (1 gives stable ratios on a loaded machine: "
        "OpenMP threads spin-wait when the cores are oversubscribed)",
    )
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    if args.one:
        kind = args.one[0]
        if kind == "lm":
            res = _lm(int(args.one[1]), int(args.one[2]), int(args.one[3]), args.one[4])
        elif kind == "quality":
            values = [int(v) for v in args.one[1:]]
            res = {"ratio": _decrease_ratio(*values)}
        else:
            res = _one(kind, int(args.one[1]), int(args.one[2]))
        print(json.dumps(res))
        return
    sizes = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    sizes = args.sizes or sizes
    results: dict = {"threads": THREADS, "rank": RANK, "rows": {}, "quality": {}, "lm": {}}
    out = args.out + ("_lm" if args.only == "lm" else "")

    def save() -> None:  # after every result: a partial run still leaves its numbers
        results["load_after"] = _load()
        with open(out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(render(results))

    def lm() -> None:
        batch, seq = (32, 32) if args.quick else (256, 64)
        for method in ("adamw", "sven"):
            load = _load()
            results["lm"][method] = _spawn("lm", str(batch), str(seq), "2", method)
            results["lm"][method]["load_before"] = load
            print("lm", method, results["lm"][method], flush=True)
            save()

    def quality() -> None:
        results["quality_load_before"] = _load()
        for q, p in QUALITY_CONFIGS:
            ratios = [
                _spawn("quality", "1024", str(q), str(seed), str(problem), str(p))["ratio"]
                for problem in QUALITY_PROBLEMS
                for seed in (1, 2, 3)
            ]
            results["quality"][f"q{q}" if p == 10 else f"q{q}-p{p}"] = ratios
            print("quality", q, p, ratios, flush=True)
            save()

    if args.only == "lm":
        lm()
        print(render(results))
        return
    if args.only == "quality":  # the rest of PREFIX.json stays as it was
        if os.path.exists(out + ".json"):
            with open(out + ".json") as f:
                results.update(json.load(f))
        results["quality"] = {}
        quality()
        print(render(results))
        return

    def run(n: int, method: str) -> None:
        # SGD steps are cheap: many, so that its median is not one noisy step
        timed = {"sgd": 20, "exact": 1}.get(method, 3 if n <= 8192 else 1)
        row = results["rows"].setdefault(str(n), {"load_before": _load()})
        row[method] = _spawn(method, str(n), str(timed))
        print(n, method, row[method], flush=True)
        save()

    for n in sizes:
        for method in ("sgd", "matfree-q0", "matfree-q1"):
            if method == "matfree-q1" and n > args.q1_max:
                continue
            run(n, method)
    quality()
    lm()
    for n in sizes:  # last: the N x N Gram matrix is the slow part of the table
        if n <= args.exact_max:
            run(n, "exact")
    print(render(results))


def render(results: dict) -> str:
    lines = [
        f"MLP 32-256-256-1, float32, {results['threads']} threads, rank k = {results['rank']};"
        " time per step and peak memory above the start, each relative to an SGD step"
        " on the same rows (measured in the same run).",
        "",
        "| N | SGD ms | SGD MB | rank-k q=0: x SGD time | x SGD mem (MB) "
        "| rank-k q=1: x SGD time | x SGD mem (MB) | exact rank-k: x SGD time | x SGD mem (MB) "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if not results["rows"]:
        lines = []
    for n, row in results["rows"].items():
        sgd = row["sgd"]
        cells = [n, f"{1e3 * sgd['seconds']:.0f}", f"{sgd['peak_mb']:.0f}"]
        for method in ("matfree-q0", "matfree-q1", "exact"):
            res = row.get(method)
            if res is None or "error" in res:
                cells += ["-" if res is None else "failed", "-"]
                continue
            cells.append(f"{res['seconds'] / sgd['seconds']:.1f}x ({res['seconds']:.1f} s)")
            cells.append(f"{res['peak_mb'] / max(sgd['peak_mb'], 1.0):.1f}x ({res['peak_mb']:.0f})")
        cells.append(row["load_before"].strip("()").split(",")[0])
        lines.append("| " + " | ".join(cells) + " |")
    if results["quality"]:
        lines += [
            "",
            "Linearised decrease of 0.5 ||r||^2, rank-64 matrix-free step / exact rank-64 step,"
            f" N = 1024, {len(QUALITY_PROBLEMS)} random problems (model and data seeds) x three"
            " sketch seeds:",
            "",
        ]
    for key, ratios in results["quality"].items():
        q, _, p = key[1:].partition("-p")
        lines.append(
            f"- power_iters={q}, oversample={p or 10}: min {min(ratios):.3f}, median"
            f" {statistics.median(ratios):.3f}, max {max(ratios):.3f} ("
            + ", ".join(f"{r:.3f}" for r in ratios)
            + ")"
        )
    lm = results.get("lm", {})
    sv, ad = lm.get("sven", {}), lm.get("adamw", {})
    if "seconds" in sv and "seconds" in ad:
        lines += [
            "",
            f"Tiny GPT-2 (transformers, vocab 64, width 64, 2 layers, 4 heads, P = {sv['params']},"
            f" float32), per-token rows N = {sv['rows']} (T = {sv['seq']} per sequence),"
            f" {sv['backend']} backend, rank 64 ({sv['solver']}, power_iters=0, adaptive"
            f" damping), {results['threads']} threads: {sv['seconds']:.1f} s per step"
            f" ({sv['seconds'] / ad['seconds']:.0f}x an AdamW step of {ad['seconds']:.2f} s),"
            f" peak +{sv['peak_mb']:.0f} MB (AdamW +{ad['peak_mb']:.0f} MB); mean token loss"
            f" {sv['first_mean_loss']:.3f} -> {sv['last_mean_loss']:.3f} after {sv['steps']}"
            f" steps (AdamW {ad['first_mean_loss']:.3f} -> {ad['last_mean_loss']:.3f});"
            f" load {float(sv['load_before'].strip('()').split(',')[0]):.2f}.",
        ]
    lines.append("")
    lines.append(f"Load average (1, 5, 15 min) at the end: {results['load_after']}")
    return "\n".join(lines).lstrip("\n") + "\n"


if __name__ == "__main__":
    main()
