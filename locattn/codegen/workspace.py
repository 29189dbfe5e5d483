"""Per-thread scratch buffers for the CPU paths (:mod:`~locattn.codegen.cpu_fast`, :mod:`~locattn.codegen.cpu_tables`).

A fresh multi-MB CPU allocation is served by ``mmap`` and page-faulted on first touch, which costs as much as
the copy into it (measured: gathering 60 MB of key blocks with ``index_select`` takes ~14x longer into a fresh
tensor than into a reused one). Internal temporaries (strips, blocked q/out, gathered key blocks, key-gradient
strips) are therefore kept per thread, by tag, and reused across calls, up to :data:`WORKSPACE_BYTES` per
thread; a request past that budget gets a fresh tensor that is not kept. Nothing handed back to the caller may
live in a workspace buffer (the next call overwrites it).
"""

from __future__ import annotations

import math
import threading

import torch

#: the most bytes of scratch one thread keeps between calls
WORKSPACE_BYTES = 512 << 20
_ws = threading.local()


def workspace(tag: str, shape, dtype, zero: bool = False) -> torch.Tensor:
    """A contiguous ``shape`` tensor backed by a reusable per-thread buffer (contents undefined unless zero)."""
    n = math.prod(shape)
    bufs = getattr(_ws, "bufs", None)
    if bufs is None:
        bufs = _ws.bufs = {}
    t = bufs.get(tag)
    if t is None or t.dtype != dtype or t.numel() < n:
        bufs.pop(tag, None)
        with torch.inference_mode(False):  # a normal tensor: reused outside inference mode, written inside it
            t = torch.empty(n, dtype=dtype)
        used = sum(b.numel() * b.element_size() for b in bufs.values())
        if used + t.numel() * t.element_size() <= WORKSPACE_BYTES:
            bufs[tag] = t
    v = t[:n].view(shape)
    return v.zero_() if zero else v


def clear_workspace() -> None:
    """Free this thread's cached temporaries."""
    _ws.bufs = {}
