"""Calibration: choose a pattern per (site, head) within an end-to-end error budget.

``locattn.calibrate(model, samples, budget=0.02)`` (:mod:`.api`), ``python -m locattn calibrate`` and the
backend's ``options={"policy": "auto"}`` (:mod:`.auto`) share one procedure (:mod:`.engine`): recording
(:mod:`.record`), candidates (:mod:`.candidates`), scoring (:mod:`.scoring`), costs (:mod:`.cost`), the
solver (:mod:`.solver`), and the commented policy (:mod:`.report`).
"""

from .api import calibrate, calibrate_with_report
from .candidates import FAMILIES, Candidate, SiteShape, register_family
from .engine import Calibration, Options
from .metrics import perplexity_change, relative_l2
from .record import CalibrationError
from .report import CalibrationReport

__all__ = ["calibrate", "calibrate_with_report", "Calibration", "CalibrationReport", "CalibrationError",
           "Candidate", "SiteShape", "FAMILIES", "register_family", "Options", "perplexity_change", "relative_l2"]
