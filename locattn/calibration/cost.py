"""The cost of a candidate at a site: the measured time of the implementation that will run it, or the
plan's block count where timing is impossible.

``time``: the op (``torch.ops.locattn.attention``, which dispatches to the implementation the registry picks
for this device, dtype and pattern) runs forward on random q / k / v of the site's shape with the site's own
mask / bias; the cost is the fastest of ``REPS`` runs after a warm-up (the minimum is the least noisy
statistic on a shared machine). Timings persist per machine in ``$LOCATTN_CACHE_DIR`` (default
``~/.cache/locattn``; set it empty to keep nothing) as ``calibration-costs-<machine>.json``, keyed by the
spec, shapes, dtypes, mask kind, thread count and torch version.

``blocks``: ``full + PARTIAL_BLOCK_COST x partial`` 64 x 64 blocks of the candidate's plan (the kernels'
work), used when timing is impossible (tensors on a device that cannot run, ``cost="blocks"``).

A content-dependent candidate (``dynamic``) is timed, or its blocks counted, on the site's recorded q / k / v
(random tensors would select other blocks); those costs are not cached (they depend on the data).

``scores`` (``cost="scores"``): the attention scores the candidate keeps on the sampled rows (:mod:`.scoring`),
the FLOPs of an exact sparse kernel: for targets stated in scores kept rather than in time on this machine.

Costs are per site call for all heads; the solver charges each head ``cost / Hq``, a content-dependent
candidate in proportion to the scores each head keeps (:func:`head_costs`; a per-head rule runs as its own head
group: the copies that costs are not modelled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time

import torch

from ..patterns.base import Layout
from ..patterns.plan import PARTIAL_BLOCK_COST, build_plan
from ..patterns.spec import HeadGroup, SiteSpec
from .candidates import Candidate

REPS = 3
COST_MODES = ("time", "blocks", "scores")


def machine_key(device: torch.device) -> str:
    """This machine's processor (or GPU model), thread count and torch version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        what = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return f"{what}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cache_path(device: torch.device) -> str | None:
    root = os.environ.get("LOCATTN_CACHE_DIR")
    if root == "":
        return None
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "locattn")
    h = hashlib.sha256(machine_key(device).encode()).hexdigest()[:12]
    return os.path.join(root, f"calibration-costs-{h}.json")


class CostCache:
    """Measured costs of this machine, loaded once, saved after each measurement batch."""

    def __init__(self, device: torch.device):
        self.path = cache_path(device)
        self.data: dict[str, float] = {}
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.data = {k: float(v) for k, v in json.load(f).items()}
            except (OSError, ValueError):
                self.data = {}

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=0, sort_keys=True)
        os.replace(tmp, self.path)


def spec_json(cand: Candidate) -> str:
    return SiteSpec((HeadGroup(None, cand.pattern, cand.layout if not cand.is_dense else Layout()),)).to_json()


def _key(cand: Candidate, q, k, v, mask, bias, is_causal: bool, mask_kind: str) -> str:
    return json.dumps([spec_json(cand), list(q.shape), list(k.shape), list(v.shape), str(q.dtype),
                       str(q.device.type), None if mask is None else list(mask.shape),
                       None if bias is None else list(bias.shape), bool(is_causal), mask_kind])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def can_time(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


@torch.no_grad()
def time_candidate(cand: Candidate, q, k, v, mask, bias, scale: float, is_causal: bool, backend: str = "") -> float:
    """Seconds of one forward of the op with ``cand`` on these tensors (fastest of :data:`REPS`)."""
    spec = spec_json(cand)

    def run():
        torch.ops.locattn.attention(q, k, v, mask, bias, scale, is_causal, spec, backend)

    run()
    _sync(q.device)
    best = float("inf")
    for _ in range(REPS):
        t0 = time.perf_counter()
        run()
        _sync(q.device)
        best = min(best, time.perf_counter() - t0)
    return best


def block_cost(cand: Candidate, s_q: int, s_k: int, is_causal: bool, block: int = 64) -> float:
    """``full + PARTIAL_BLOCK_COST x partial`` blocks of the candidate's plan."""
    layout = cand.layout.resolve(s_q) if not cand.is_dense else Layout()
    plan = build_plan(cand.pattern, layout, s_q, s_k, block, block, is_causal)
    return float(plan.n_full + PARTIAL_BLOCK_COST * (plan.nnz - plan.n_full))


def head_costs(cand: Candidate, site_cost: float, kept: torch.Tensor) -> torch.Tensor:
    """``[H]`` each head's share of one site call's cost ``site_cost`` (``kept``: ``[H]`` scores each head keeps on
    the sampled rows). A static candidate costs every head the same; a content-dependent one keeps more keys on
    some heads than on others, so each head pays in proportion to the scores it keeps."""
    h = kept.shape[0]
    if cand.static or not float(kept.sum()) > 0 or not math.isfinite(site_cost):
        return torch.full((h,), site_cost / h, dtype=torch.float64)
    return site_cost * kept.double() / kept.double().sum()


def dynamic_block_cost(cand: Candidate, q, k, v, scale: float, is_causal: bool) -> float:
    """``full + PARTIAL_BLOCK_COST x partial`` pooling blocks a content-dependent candidate visits per (batch,
    head) on these (recorded) tensors: its call's block tables, as the kernels walk them."""
    t = cand.call(q, k, v, scale, is_causal).dynamic_tables()
    n = (t.kv_ptr[:, -1] - t.kv_ptr[:, 0]).double()
    full = (t.kv_split - t.kv_ptr[:, :-1]).sum(-1).double()
    return float((full + PARTIAL_BLOCK_COST * (n - full)).mean())


def make_inputs(q_shape, k_shape, v_shape, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(s, generator=g, dtype=torch.float32).to(device, dtype) for s in (q_shape, k_shape, v_shape))
