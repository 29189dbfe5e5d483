"""Shared by the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import json
import os

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def write_results(name: str, quick: bool, meta: dict, rows: list, out: str | None = None) -> str:
    """Write ``{"meta": ..., "rows": ...}`` to ``out`` or ``benchmarks/out/<name>[_quick].json``; returns the path."""
    out = out or os.path.join(OUT_DIR, f"{name}_quick.json" if quick else f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return out
