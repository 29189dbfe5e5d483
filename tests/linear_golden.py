"""Shared by the linear / hybrid mechanism tests: cases and the check of an implementation against the fp64
reference (:class:`locattn.codegen.linear.naive.LinearReference`), forward and backward.

Tolerance: an fp32 result is accepted when its error against the fp64 golden is within ``FUDGE x`` the error
of the same reference run in fp32 (the materialised definition in plain PyTorch) plus ``FLOOR x`` the largest
golden value (:func:`locattn.testing.max_err`; the floor is 3x ``locattn.testing.FLOOR``). The fast paths
associate differently: ``fq (fk^T v)`` and the backward's ``fk (sum_i fq_i gn_i^T)`` sum large intermediates
first (rows with tiny denominators have large ``gn``) and the hybrid's linear term is (all keys) - (pattern
keys); measured error ratios over these cases are 0.5 - 6 with a few gradient entries near the floor, hence
FUDGE = 8 and the wider floor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from locattn.codegen.linear.naive import LinearReference
from locattn.codegen.registry import AttentionCall
from locattn.patterns import Dense, Layout
from locattn.patterns.mechanism import Mechanism
from locattn.testing import max_err

FUDGE = 8.0
FLOOR = {torch.float64: 1e-10, torch.float32: 3e-5}


@dataclass
class Case:
    id: str
    kind: str = "linear"
    feature_map: str = "elu"
    pattern: object = field(default_factory=Dense)
    layout: Layout = field(default_factory=Layout)
    s: int = 63
    s_k: int | None = None
    d: int = 40
    dv: int | None = None
    hq: int = 2
    hk: int = 2
    b: int = 1
    causal: bool = False
    mask: str = ""          # "" | "keys" ([B, 1, 1, Sk] key padding) | "heads" ([B, Hq, 1, Sk])
    features: int = 32
    scale: float | None = None

    def call(self, device="cpu", dtype=torch.float32) -> AttentionCall:
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        s_k = self.s_k or self.s
        dv = self.dv or self.d

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        q, k, v = rnd(self.b, self.hq, self.s, self.d), rnd(self.b, self.hk, s_k, self.d), rnd(self.b, self.hk, s_k, dv)
        mask = None
        if self.mask:
            heads = self.hq if self.mask == "heads" else 1
            mask = (torch.rand(self.b, heads, 1, s_k, generator=gen) > 0.3).to(device)
        mech = Mechanism(self.kind, self.feature_map, features=self.features if self.feature_map == "favor" else 64)
        layout = self.layout.resolve(self.s) if self.pattern.local else self.layout
        scale = self.scale if self.scale is not None else self.d ** -0.5
        return AttentionCall(q, k, v, mask, None, scale, self.causal, self.pattern, layout,
                             mechanism=mech)


def call64(call: AttentionCall) -> AttentionCall:
    return AttentionCall(call.q.double(), call.k.double(), call.v.double(), call.mask, None, call.scale,
                         call.is_causal, call.pattern, call.layout, mechanism=call.mechanism)


def as_cpu(call: AttentionCall) -> AttentionCall:
    mask = call.mask.cpu() if call.mask is not None else None
    return AttentionCall(call.q.cpu(), call.k.cpu(), call.v.cpu(), mask, None, call.scale, call.is_causal,
                         call.pattern, call.layout, mechanism=call.mechanism)


def check(impl, call: AttentionCall, factor: float = FUDGE) -> None:
    """``impl``'s forward and backward against the fp64 reference; fp64 calls must match to ~1e-10."""
    out, lse = impl.forward(call)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    dq, dk, dv, db = impl.backward(call, g, out, lse, False)
    assert db is None
    ref = LinearReference()
    c64 = call64(as_cpu(call))
    gold_o, gold_l = ref.forward(c64)
    gold = (gold_o, gold_l, *ref.backward(c64, g.cpu().double(), gold_o, gold_l, False)[:3])
    eager = None
    if call.q.dtype != torch.float64:
        c32 = as_cpu(call)
        e_o, e_l = ref.forward(c32)
        eager = (e_o, e_l, *ref.backward(c32, g.cpu(), e_o, e_l, False)[:3])
    got = (out, lse, dq, dk, dv)
    for i, (name, a, b) in enumerate(zip(("out", "lse", "dq", "dk", "dv"), got, gold)):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{name}: NaN"
        err = max_err(a.cpu(), b)
        bound = FLOOR[call.q.dtype] * max(1.0, float(b[torch.isfinite(b)].abs().max()) if b.numel() else 1.0)
        if eager is not None:
            bound += factor * max_err(eager[i], b)
        assert err <= bound, f"{name}: max error {err:.3g} vs fp64 golden exceeds {bound:.3g}"
