"""Token-grid inference for ``grid = "auto"`` / ``globals = "auto"``.

The grid of a site is proven, not matched by size: :mod:`locattn.passes.token_layout` follows the patch
embedding (a ``conv2d`` / ``conv3d`` whose output is flattened into tokens) through every view, permute, flatten,
``cat`` and per-position op to the site's queries, and reads the grid off the factors of their sequence axis, in
token order: ``(T,) H, W`` for the usual ``flatten(2).transpose(1, 2)``, ``(W, H)`` for a W-major flatten,
``(F, H, W)`` when frames are folded into the convolution's batch (CogVideoX); tokens joined by ``cat`` before
or after the image part are ``prefix`` / ``suffix`` globals. A site whose token order the graph does not show
gets no grid, and ``site.token_grid_why`` names the op where the proof stopped. Packed-latent models (FLUX,
AuraFlow, LTX-Video: no convolution names the grid) are the next pass's, :mod:`locattn.passes.grid_packed`.
"""

from __future__ import annotations

import torch.fx as fx

from .sites import AttentionSite
from .token_layout import site_grids


def infer_token_grids(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Set ``site.token_grid = (grid, prefix, suffix)`` and ``site.token_grid_desc`` where the graph proves them,
    else ``site.token_grid_why``."""
    if sites:
        site_grids(gm, sites)
