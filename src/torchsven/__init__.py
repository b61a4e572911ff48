"""torchsven: Singular Value Descent (Sven) for PyTorch.

Sven solves for every residual row at once: ``theta <- theta - lr * J^+_k r``
with a truncated (optionally damped) pseudo-inverse of the per-row Jacobian.
"""

from . import pde, pinn, residuals
from .config import BacktrackingLineSearch
from .damping import AdaptiveDamping
from .errors import NonFiniteError, SvenFallbackWarning, SvenPerformanceWarning
from .info import StepInfo
from .least_squares import LeastSquaresResult, least_squares
from .optim import Sven
from .polyak import PolyakSGD
from .residuals import from_errors, from_losses
from .spectrum import SpectrumRecord, effective_rank, plot_spectrum

__all__ = [
    "AdaptiveDamping",
    "BacktrackingLineSearch",
    "LeastSquaresResult",
    "NonFiniteError",
    "PolyakSGD",
    "SpectrumRecord",
    "StepInfo",
    "Sven",
    "SvenFallbackWarning",
    "SvenPerformanceWarning",
    "__version__",
    "effective_rank",
    "from_errors",
    "from_losses",
    "least_squares",
    "pde",
    "pinn",
    "plot_spectrum",
    "residuals",
]

__version__ = "0.1.0"
