"""locattn: a torch.compile backend that turns softmax attention into policy-chosen local/sparse attention.

    model = torch.compile(model, backend="locattn", options={"policy": "policy.toml"})
    print(locattn.explain(model, x, policy="policy.toml"))
"""

from . import ops  # noqa: F401  (registers torch.ops.locattn.*)
from .backend import LocattnBackend, backend
from .calibration import CalibrationError, calibrate
from .counters import counters, densities, reset_counters
from .explain import Report, explain
from .grafting import graft
from .passes.rewrite import LocattnWarning
from .patterns import PATTERNS, Layout, PatternError
from .patterns.mechanism import Mechanism
from .policy import Policy, PolicyError

__version__ = "0.1.0"

__all__ = [
    "backend", "LocattnBackend", "explain", "Report", "counters", "densities", "reset_counters", "Policy",
    "PolicyError", "PatternError", "PATTERNS", "Layout", "LocattnWarning", "graft", "Mechanism", "calibrate",
    "CalibrationError",
]
