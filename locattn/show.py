"""Pictures of a pattern: which keys one query attends on its grid, and the block plan (matplotlib extra)."""

from __future__ import annotations

import torch

from .patterns import PATTERNS, Layout
from .patterns.base import allowed
from .patterns.plan import build_plan


def show(pattern_name: str, grid: tuple[int, ...], params: dict, query: tuple[int, ...] | None = None,
         block: int = 64, output: str = "pattern.png") -> str:
    """Draw ``pattern_name(**params)`` on ``grid``: left, the keys of ``query`` (2-D slice through the query for
    3-D grids); right, the block plan (full blocks dark, partial light). Returns the output path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional extra
        raise SystemExit("locattn show needs matplotlib: pip install 'locattn[show]'") from e
    cls = PATTERNS[pattern_name]
    pattern = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    pattern.validate(grid)
    layout = Layout(grid=grid)
    s = layout.n_grid
    query = query or tuple(n // 2 for n in grid)
    qi = 0
    for c, n in zip(query, grid):
        qi = qi * n + c
    keys = allowed(pattern, layout, torch.tensor([[qi]]), torch.arange(s)[None]).view(grid)
    plan = build_plan(pattern, layout, s, s, block, block)
    occ = torch.zeros(plan.n_qblocks, plan.n_kblocks)
    rows = torch.repeat_interleave(torch.arange(plan.n_qblocks), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    occ[rows, plan.kv_idx] = torch.where(plan.kv_full, 2.0, 1.0)
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    img = keys.float()
    if len(grid) == 3:
        img = img[query[0]]
    elif len(grid) == 1:
        img = img[None]
    ax[0].imshow(img, cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    qpos = query[-2:] if len(grid) >= 2 else (0, query[0])
    ax[0].plot(qpos[1], qpos[0], "r*", markersize=10)
    ax[0].set_title(f"{pattern.describe()} on {'x'.join(map(str, grid))}: keys of query {query}")
    ax[1].imshow(occ, cmap="Greys", interpolation="nearest", vmin=0, vmax=2)
    ax[1].set_title(f"block plan {block}x{block}: {plan.n_full} full, {plan.nnz - plan.n_full} partial "
                    f"of {plan.n_qblocks * plan.n_kblocks}")
    ax[1].set_xlabel("key block")
    ax[1].set_ylabel("query block")
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    plt.close(fig)
    return output
