"""torchsven: Singular Value Descent (Sven) for PyTorch.

Sven solves for every residual row at once: ``theta <- theta - lr * J^+_k r``
with a truncated (optionally damped) pseudo-inverse of the per-row Jacobian.
"""

from .damping import AdaptiveDamping
from .errors import NonFiniteError, SvenFallbackWarning
from .globalize import BacktrackingLineSearch
from .info import StepInfo
from .optim import Sven
from .residuals import from_errors, from_losses

__all__ = [
    "AdaptiveDamping",
    "BacktrackingLineSearch",
    "NonFiniteError",
    "StepInfo",
    "Sven",
    "SvenFallbackWarning",
    "__version__",
    "from_errors",
    "from_losses",
]

__version__ = "0.1.0"
