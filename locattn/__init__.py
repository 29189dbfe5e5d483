"""locattn: a torch.compile backend that turns softmax attention into policy-chosen local/sparse attention.

    model = torch.compile(model, backend="locattn", options={"policy": "policy.toml"})
    print(locattn.explain(model, x, policy="policy.toml"))
"""

from . import ops  # noqa: F401  (registers torch.ops.locattn.*)
from .backend import LocattnBackend, backend
from .calibration import CalibrationError, calibrate
from .counters import counters, reset_counters
from .explain import Report, explain
from .passes.rewrite import LocattnWarning
from .patterns import PATTERNS, Layout, PatternError
from .policy import Policy, PolicyError

__version__ = "0.1.0"

__all__ = [
    "backend", "LocattnBackend", "explain", "Report", "counters", "reset_counters", "Policy", "PolicyError",
    "PatternError", "PATTERNS", "Layout", "LocattnWarning", "calibrate", "CalibrationError",
]
