"""Sven's options: one frozen record, one set of validators, one compatibility matrix.

:func:`make_config` turns the keyword arguments of ``Sven(...)`` into a
:class:`SvenConfig` or raises a ``TypeError`` / ``ValueError`` that names the
argument (or, for a refused combination, both arguments). Nothing else in the
package validates options. See ``docs/design.md`` ("Options").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .backends import BACKENDS
from .backends.generic import DEFAULT_CHUNK_BYTES
from .damping import AdaptiveDamping, default_rtol, parse_damping, serialize_damping
from .masks import MASKS
from .precondition import PRECONDITIONERS
from .solve import SOLVERS, SpectralFilter

__all__ = [
    "CORE_OPTIONS",
    "GLOBAL_OPTIONS",
    "GROUP_KEYS",
    "NONFINITE_MODES",
    "VARIANT_OPTIONS",
    "BacktrackingLineSearch",
    "SvenConfig",
    "check_compatible",
    "check_nonnegative",
    "default_damping",
    "make_config",
    "parse_line_search",
    "with_overrides",
]

#: Accepted values of ``Sven(on_nonfinite=...)``.
NONFINITE_MODES = ("raise", "skip")

#: Options saved under ``state_dict()["sven"]["options"]`` (the 0.1.0 layout).
CORE_OPTIONS = (
    "rank",
    "rtol",
    "atol",
    "damping",
    "backend",
    "solver",
    "line_search",
    "on_nonfinite",
)

#: The paper's options, saved under ``state_dict()["sven"]["variants"]["options"]``.
VARIANT_OPTIONS = (
    "precondition",
    "rmsprop_alpha",
    "rmsprop_eps",
    "momentum",
    "variable_rank",
    "param_fraction",
    "mask",
    "seed",
    "randomized",
    "oversample",
    "power_iters",
    "spectrum_every",
)

#: Options that hold for the whole solve; a param group may not set them.
GLOBAL_OPTIONS = (
    *CORE_OPTIONS,
    "max_trials",
    *VARIANT_OPTIONS,
    "microbatch_size",
    "verify",
    "chunk_bytes",
)

#: Keys a param group may hold besides the global options: Sven's own and those
#: torch.optim's learning-rate schedulers add.
GROUP_KEYS = frozenset(
    {
        "params",
        "lr",
        "name",
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_lr",
        "base_momentum",
        "max_momentum",
    }
)


@dataclass(frozen=True)
class BacktrackingLineSearch:
    """Options of ``line_search="backtracking"``.

    Attributes:
        armijo: sufficient-decrease constant ``c`` in
            ``f(theta - alpha h) <= f(theta) - c alpha r^T J h``.
        max_trials: closure calls before the step is given up (parameters restored).
        shrink_min, shrink_max: the next ``alpha`` is the minimiser of the
            quadratic through ``f(0)``, the slope and ``f(alpha)``, clipped to
            ``[shrink_min alpha, shrink_max alpha]``.
    """

    armijo: float = 1e-4
    max_trials: int = 10
    shrink_min: float = 0.1
    shrink_max: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int):
            raise TypeError("BacktrackingLineSearch.max_trials must be an int >= 1")
        if self.max_trials < 1:
            raise ValueError(
                f"BacktrackingLineSearch.max_trials must be >= 1, got {self.max_trials}"
            )
        for name in ("armijo", "shrink_min", "shrink_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"BacktrackingLineSearch.{name} must be a real number")
        if not 0 < self.armijo < 1:
            raise ValueError(f"BacktrackingLineSearch.armijo must be in (0, 1), got {self.armijo}")
        if not 0 < self.shrink_min <= self.shrink_max < 1:
            raise ValueError(
                "BacktrackingLineSearch needs 0 < shrink_min <= shrink_max < 1, got "
                f"{self.shrink_min} and {self.shrink_max}"
            )


#: the default damping (frozen, so one instance can be shared)
_ADAPTIVE = AdaptiveDamping()


@dataclass(frozen=True)
class SvenConfig:
    """Every validated option of one ``Sven`` (see its docstring for the meanings)."""

    rank: int | None = None
    rtol: float = 1e-3
    atol: float = 1e-10
    damping: float | AdaptiveDamping = _ADAPTIVE
    backend: str = "auto"
    solver: str = "auto"
    line_search: BacktrackingLineSearch | None = None
    on_nonfinite: str = "raise"
    max_trials: int = 1
    precondition: str | None = None
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    momentum: float = 0.0
    variable_rank: bool = False
    param_fraction: float = 1.0
    mask: str = "entries"
    seed: int = 0
    randomized: bool = False
    oversample: int = 10
    power_iters: int = 2
    spectrum_every: int | None = None
    microbatch_size: int | None = None
    verify: str = "auto"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    # ------------------------------------------------------------ derived
    @property
    def adaptive(self) -> bool:
        return isinstance(self.damping, AdaptiveDamping)

    @property
    def globalized(self) -> str | None:
        """Which acceptance policy that calls the closure again is set, or None."""
        if self.adaptive or self.line_search is not None:
            return "damping='adaptive' or line_search"
        if self.on_nonfinite != "raise":
            return "on_nonfinite='skip'"
        return None

    @property
    def masked(self) -> bool:
        return self.param_fraction < 1.0

    @property
    def needs_jacobian(self) -> bool:
        """The direction needs the materialised J (generic backend's Jacobian)."""
        return (
            self.precondition == "pre"
            or self.variable_rank
            or (self.masked and self.mask == "entries")
        )

    @property
    def needs_generic(self) -> bool:
        """Only the generic backend computes these options' direction."""
        return self.needs_jacobian

    @property
    def changes_update(self) -> bool:
        """``"post"`` or momentum: the applied update differs from the direction."""
        return self.precondition == "post" or self.momentum > 0

    def filter(self, relative_damping: float | None = None) -> SpectralFilter:
        """The spectral filter of a step (``relative_damping``: adaptive factor)."""
        if self.adaptive:
            factor = self.damping.init if relative_damping is None else relative_damping
            return SpectralFilter(self.rank, self.rtol, self.atol, 0.0, relative_damping=factor)
        return SpectralFilter(self.rank, self.rtol, self.atol, self.damping)

    # ---------------------------------------------------------- state_dict
    def core_dict(self) -> dict[str, Any]:
        """The core options as plain data (loads with ``weights_only=True``)."""
        out = {name: getattr(self, name) for name in CORE_OPTIONS}
        out["damping"] = serialize_damping(self.damping)
        if self.line_search is not None:
            out["line_search"] = asdict(self.line_search)
        out["max_trials"] = self.max_trials
        return out

    def variant_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in VARIANT_OPTIONS}


# ------------------------------------------------------------------ validators
def _number(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite real number >= 0 (``lr``, ``rtol``, ``atol``)."""
    value = _number(name, value, "a real number >= 0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _interval(name: str, value: Any, low: float, high: float, low_open: bool, text: str) -> float:
    """A finite number in ``(low, high)`` / ``[low, high)`` (or ``(low, high]`` if high is 1)."""
    value = _number(name, value, text)
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value <= high if text.endswith("1]") else value < high)
    if not ok:
        raise ValueError(f"{name} must be {text}, got {value!r}")
    return value


def _int(name: str, value: Any, low: int, text: str, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {text}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be {text}, got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if (value is not None and not isinstance(value, str)) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def parse_line_search(value: Any) -> BacktrackingLineSearch | None:
    """``line_search=``: None/False (off), True/"backtracking", an instance, or its dict."""
    if value is None or value is False:
        return None
    if value is True or value == "backtracking":
        return BacktrackingLineSearch()
    if isinstance(value, BacktrackingLineSearch):
        return value
    if isinstance(value, dict):
        return BacktrackingLineSearch(**value)
    if isinstance(value, str):
        raise ValueError(f"line_search must be None, 'backtracking' or True, got {value!r}")
    raise TypeError(
        "line_search must be None, 'backtracking', a bool or a BacktrackingLineSearch, got "
        f"{type(value).__name__}"
    )


def default_damping(options: dict[str, Any]) -> str | float:
    """``damping=None``: "adaptive", or 0 where an option cannot combine with it.

    Adaptive damping is the default because it never diverged on the benchmark
    (``benchmarks/defaults/``); options that change the update after the solve
    (``precondition="post"``, ``momentum``, ``variable_rank``) or search along it
    (``line_search``) take the plain, undamped step instead.
    """
    plain = (
        options.get("precondition") == "post"
        or options.get("momentum", 0.0) not in (0, 0.0)
        or options.get("variable_rank") is True
        or options.get("line_search") not in (None, False)
    )
    return 0.0 if plain else "adaptive"


def make_config(**options: Any) -> SvenConfig:
    """Validate ``Sven``'s options (any subset; the rest take their defaults).

    ``rtol=None`` resolves to :func:`torchsven.damping.default_rtol`. Raises
    TypeError / ValueError naming the argument; the combinations are checked by
    :func:`check_compatible`, which needs to know about the model and process group.
    """
    known = {f.name for f in fields(SvenConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown Sven options {unknown}")
    defaults = {f.name: f.default for f in fields(SvenConfig)}
    o = {**defaults, "rtol": None, "damping": None, **options}
    o["damping"] = default_damping(o) if o["damping"] is None else o["damping"]
    damping = parse_damping(o["damping"])
    rtol = default_rtol(damping) if o["rtol"] is None else check_nonnegative("rtol", o["rtol"])
    if not isinstance(o["backend"], str) or o["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {o['backend']!r}")
    if not isinstance(o["solver"], str) or o["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {o['solver']!r}")
    chunk = o["chunk_bytes"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk!r}")
    if o["precondition"] not in PRECONDITIONERS:
        raise ValueError(f"precondition must be None, 'pre' or 'post', got {o['precondition']!r}")
    return SvenConfig(
        rank=_int("rank", o["rank"], 1, "None or an int >= 1", optional=True),
        rtol=rtol,
        atol=check_nonnegative("atol", o["atol"]),
        damping=damping,
        backend=o["backend"],
        solver=o["solver"],
        line_search=parse_line_search(o["line_search"]),
        on_nonfinite=_choice("on_nonfinite", o["on_nonfinite"], NONFINITE_MODES),
        max_trials=_int("max_trials", o["max_trials"], 1, "an int >= 1"),
        precondition=o["precondition"],
        rmsprop_alpha=_interval(
            "rmsprop_alpha", o["rmsprop_alpha"], 0.0, 1.0, False, "a number in [0, 1)"
        ),
        rmsprop_eps=_interval(
            "rmsprop_eps", o["rmsprop_eps"], 0.0, math.inf, True, "a finite number > 0"
        ),
        momentum=_interval("momentum", o["momentum"], 0.0, 1.0, False, "a number in [0, 1)"),
        variable_rank=_bool("variable_rank", o["variable_rank"]),
        param_fraction=_interval(
            "param_fraction", o["param_fraction"], 0.0, 1.0, True, "a number in (0, 1]"
        ),
        mask=_choice("mask", o["mask"], MASKS),
        seed=_int("seed", o["seed"], 0, "an int >= 0"),
        randomized=_bool("randomized", o["randomized"]),
        oversample=_int("oversample", o["oversample"], 0, "an int >= 0"),
        power_iters=_int("power_iters", o["power_iters"], 0, "an int >= 0"),
        spectrum_every=_int(
            "spectrum_every", o["spectrum_every"], 1, "None or an int >= 1", optional=True
        ),
        microbatch_size=_int(
            "microbatch_size", o["microbatch_size"], 1, "None or an int >= 1", optional=True
        ),
        verify=_choice("verify", o["verify"], ("auto", "always")),
        chunk_bytes=chunk,
    )


def check_compatible(config: SvenConfig, has_model: bool, distributed: bool) -> None:
    """The compatibility matrix: each refused pair raises a ValueError naming both.

    Allowed and tested: every option with every other unless listed here.
    """
    c = config
    if c.line_search is not None and c.adaptive:
        raise ValueError(
            "line_search needs a fixed damping (a number); damping='adaptive' already "
            "rejects steps that do not reduce the objective"
        )
    if c.max_trials > 1 and not c.adaptive:
        raise ValueError(
            "max_trials > 1 needs damping='adaptive' (it retries a rejected step with "
            "more damping within one call)"
        )
    if c.variable_rank and c.changes_update:
        raise ValueError(
            "variable_rank=True cannot be combined with precondition='post' or momentum > 0: "
            "variable rank chooses the update by evaluating the objective at it, and those "
            "options change the update afterwards (precondition='pre' is allowed)"
        )
    if c.randomized and c.rank is None:
        raise ValueError(
            "randomized=True needs rank=k: the randomized SVD's target rank "
            "(the sketch has rank + oversample columns)"
        )
    if c.masked and c.mask == "rows" and not has_model:
        raise ValueError(
            "mask='rows' needs the model whose layers are masked: pass Sven(model, ...) or model="
        )
    if (c.changes_update or c.variable_rank) and (c.adaptive or c.line_search is not None):
        raise ValueError(
            "precondition='post', momentum and variable_rank cannot be combined with "
            "damping='adaptive' or line_search: those accept or scale the step by the "
            "objective, and these change the update afterwards (param_fraction, "
            "precondition='pre' and randomized can)"
        )
    if c.variable_rank and c.on_nonfinite != "raise":
        raise ValueError(
            "variable_rank cannot be combined with on_nonfinite='skip': variable rank "
            "evaluates the objective along the step and has no skip path"
        )
    if distributed:
        refused = [
            name
            for name, on in (
                ("precondition='pre'", c.precondition == "pre"),
                ("variable_rank", c.variable_rank),
                ("param_fraction < 1", c.masked),
            )
            if on
        ]
        if refused:
            raise ValueError(
                f"{', '.join(refused)} cannot be combined with process_group (distributed "
                "Sven) yet; precondition='post', momentum, randomized and spectrum_every can"
            )
    if c.needs_generic and c.backend not in ("auto", "generic"):
        raise ValueError(
            f"backend={c.backend!r} cannot be combined with precondition='pre', variable_rank "
            "or mask='entries' with param_fraction < 1: they need the materialised Jacobian "
            "of the generic backend (backend='generic' or 'auto')"
        )
    if c.microbatch_size is not None and distributed:
        raise ValueError(
            "microbatch_size cannot be combined with process_group: each rank's groups "
            "would have to match the single-process grouping of the concatenated batch"
        )


def with_overrides(config: SvenConfig, **changes: Any) -> SvenConfig:
    """A copy of ``config`` with ``changes`` validated like the constructor's."""
    current = {f.name: getattr(config, f.name) for f in fields(SvenConfig)}
    return make_config(**{**current, **changes})
