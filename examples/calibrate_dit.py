"""Calibration target for the demo model: ``python -m locattn calibrate examples/calibrate_dit.py:make``.

Returns the DiT-like model of ``dit_model.py`` (random weights: this shows the mechanics, not fidelity) and four
samples of latents at the demo's size (64 x 64 tokens); the last one is held out for validation.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_model import TinyDiT  # noqa: E402


def make(size: int = 128, layers: int = 4, n: int = 4):
    torch.manual_seed(0)
    model = TinyDiT(layers=layers).eval()
    samples = [(torch.randn(1, 4, size, size),) for _ in range(n)]
    return model, samples


def make_small():
    """A quick variant (32 x 32 tokens, 2 layers) for tests."""
    return make(size=64, layers=2)
