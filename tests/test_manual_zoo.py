"""Hand-written attention in many spellings: the manual matcher must rewrite each into ``locattn::attention``.

Every positive module is checked four ways: the rewrite fired (counter), the compiled graph calls the op and no
softmax, compiled == eager against an fp64 golden (forward), and the same for the gradients of inputs and
parameters. Negative modules (probabilities returned, soft-capping after a bias, training dropout, classifier
heads, MoE routers) are left alone — reported with a reason where they are attention — and still compute the same.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn.backend import LocattnBackend
from locattn.testing import assert_close_to_golden

D_MODEL, HEADS = 32, 4
DH = D_MODEL // HEADS


class Recording(LocattnBackend):
    """A locattn backend that keeps the code of every graph after the rewrite."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.codes: list[str] = []

    def __call__(self, gm, example_inputs, **kwargs):
        out = super().__call__(gm, example_inputs, **kwargs)
        self.codes.append(gm.code)
        return out


class Heads(nn.Module):
    """q/k/v projections shared by the zoo: ``x [B, S, 32]`` -> ``[B, H, S, Dh]`` (k/v with ``hk`` heads)."""

    def __init__(self, hk: int = HEADS, dv: int = DH):
        super().__init__()
        self.hk, self.dv = hk, dv
        self.q = nn.Linear(D_MODEL, HEADS * DH)
        self.k = nn.Linear(D_MODEL, hk * DH)
        self.v = nn.Linear(D_MODEL, hk * dv)
        self.o = nn.Linear(HEADS * dv, D_MODEL)

    def split(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        b, s, _ = x.shape
        sk = ctx.shape[1]
        q = self.q(x).view(b, s, HEADS, DH).transpose(1, 2)
        k = self.k(ctx).view(b, sk, self.hk, DH).transpose(1, 2)
        v = self.v(ctx).view(b, sk, self.hk, self.dv).transpose(1, 2)
        return q, k, v

    def merge(self, o):  # [B, H, S, Dv] -> [B, S, H*Dv]
        b, h, s, dv = o.shape
        return self.o(o.transpose(1, 2).reshape(b, s, h * dv))


# ------------------------------------------------------------------------------------------------ positives

class MatmulTransposeMul(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = (q @ k.transpose(-2, -1)) * DH ** -0.5
        return self.merge(a.softmax(dim=-1) @ v)


class TorchMatmulMTDivSqrt(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.matmul(q, k.mT) / math.sqrt(DH)
        return self.merge(torch.matmul(F.softmax(a, dim=-1), v))


class MethodMatmulPermute(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = 0.5 * q.matmul(k.permute(0, 1, 3, 2)) * (2 * DH ** -0.5)
        return self.merge(torch.softmax(a, 3).matmul(v))


class ScaleOnQ(Heads):
    """timm's unfused Attention: q * scale before the contraction."""

    def forward(self, x):
        q, k, v = self.split(x)
        q = q * DH ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = F.dropout(attn, 0.1, training=False)
        return self.merge(attn @ v)


class ScaleOnQAndK(Heads):
    """d**-0.25 on each of q and k (OpenAI's guided-diffusion QKVAttention)."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = 1 / math.sqrt(math.sqrt(DH))
        w = torch.einsum("bhtc,bhsc->bhts", q * s, k * s)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        return self.merge(torch.einsum("bhts,bhsc->bhtc", w, v))


class BmmFolded(Heads):
    """Heads folded into the batch: [B*H, S, D] with torch.bmm (heads recovered from the reshape)."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b * HEADS, s, DH) for t in self.split(x))
        a = torch.bmm(q, k.transpose(1, 2)) * DH ** -0.5
        o = torch.bmm(a.softmax(-1), v)
        return self.merge(o.view(b, HEADS, s, DH))


class BaddbmmBeta0(Heads):
    """diffusers' classic AttnProcessor: baddbmm(empty, q, kᵀ, beta=0, alpha=scale) -> softmax -> .to -> bmm."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b * HEADS, s, DH) for t in self.split(x))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=DH ** -0.5)
        probs = scores.softmax(dim=-1).to(q.dtype)
        return self.merge(torch.bmm(probs, v).view(b, HEADS, s, DH))


class BaddbmmBias(Heads):
    """baddbmm with a real bias (key padding as a float bias in the folded layout), beta and alpha."""

    def forward(self, x, pad_bias):
        b, s, _ = x.shape
        q, k, v = (t.reshape(b * HEADS, s, DH) for t in self.split(x))
        bias = pad_bias.repeat_interleave(HEADS, dim=0)            # [B*H, 1, S]
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=0.5, alpha=0.3)
        return self.merge(torch.bmm(scores.softmax(-1), v).view(b, HEADS, s, DH))


class EinsumBHSD(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) * DH ** -0.5
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", a.softmax(-1), v))


class EinsumBSHD(nn.Module):
    """[B, S, H, D] einsum with unusual letters; the output stays [B, S, H, D]."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.o = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, DH).unbind(2)
        w = torch.einsum("nihc,njhc->nhij", q, k) / math.sqrt(DH)
        o = torch.einsum("nhij,njhc->nihc", w.softmax(-1), v)
        return self.o(o.reshape(b, s, D_MODEL))


class EinsumEllipsis(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.einsum("...id,...jd->...ij", q, k) * DH ** -0.5
        return self.merge(torch.einsum("...ij,...jd->...id", a.softmax(-1), v))


class CausalTrilBuffer(Heads):
    """GPT-style causal mask from a tril buffer: masked_fill(tril == 0, -inf)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x):
        s = x.shape[1]
        q, k, v = self.split(x)
        a = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(DH))
        a = a.masked_fill(self.tril[:, :, :s, :s] == 0, float("-inf"))
        return self.merge(F.softmax(a, dim=-1) @ v)


class KeyPaddingFinfoMin(Heads):
    """Bool key-padding mask [B, 1, 1, S] (True = keep) applied with masked_fill(~m, finfo.min)."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        a = q @ k.transpose(-1, -2) / math.sqrt(DH)
        a = a.masked_fill(~keep, torch.finfo(a.dtype).min)
        return self.merge(a.softmax(-1) @ v)


class WhereMask(Heads):
    def forward(self, x, allowed):
        q, k, v = self.split(x)
        a = (q @ k.transpose(-1, -2)) * DH ** -0.5
        a = torch.where(allowed, a, float("-inf"))
        return self.merge(a.softmax(-1) @ v)


class BiasBeforeScale(Heads):
    """A learned bias added before the scale: the op must receive the bias times the scale."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(HEADS, 1, 7) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, HEADS, 7, 7))

    def forward(self, x):
        q, k, v = self.split(x)
        a = (q @ k.transpose(-1, -2) + self.pos + self.rel) / math.sqrt(DH)
        return self.merge(a.softmax(-1) @ v)


class HFEagerFloatMask(Heads):
    """transformers' eager path: *scaling, + float mask [B,1,S,S], softmax(dtype=fp32).to, dropout(eval)."""

    def forward(self, x, add_mask):
        q, k, v = self.split(x)
        w = torch.matmul(q, k.transpose(2, 3)) * DH ** -0.5
        w = w + add_mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        o = torch.matmul(w, v).transpose(1, 2).contiguous()
        return self.o(o.reshape(x.shape[0], x.shape[1], -1))


def repeat_kv(x, n_rep):
    b, hk, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)


class GQARepeatKV(Heads):
    def __init__(self):
        super().__init__(hk=2)

    def forward(self, x, causal):
        q, k, v = self.split(x)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = torch.matmul(q, k.transpose(2, 3)) * DH ** -0.5
        w = w.masked_fill(~causal, torch.finfo(w.dtype).min)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(w, v))


class GQARepeatInterleave(Heads):
    def __init__(self):
        super().__init__(hk=1, dv=12)

    def forward(self, x):
        q, k, v = self.split(x)
        k, v = k.repeat_interleave(HEADS, dim=1), torch.repeat_interleave(v, HEADS, dim=1)
        return self.merge((q @ k.mT * DH ** -0.5).softmax(-1) @ v)


class MQABroadcast(Heads):
    """One kv head broadcast by matmul itself ([B, 1, S, D])."""

    def __init__(self):
        super().__init__(hk=1)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge((q @ k.transpose(-1, -2) * DH ** -0.5).softmax(-1) @ v)


class CrossAttnDv(Heads):
    """Sq != Sk and Dv != D."""

    def __init__(self):
        super().__init__(dv=12)

    def forward(self, x, ctx):
        q, k, v = self.split(x, ctx)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) * DH ** -0.5, dim=-1) @ v)


class SwinWindow(nn.Module):
    """Swin's WindowAttention: [B*nW, H, N, D], relative-position bias, shift mask through view(-1, nW, H, N, N)."""

    def __init__(self, win=3, n_windows=4):
        super().__init__()
        self.n = win * win
        self.nw = n_windows
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.table = nn.Parameter(torch.randn((2 * win - 1) ** 2, HEADS) * 0.2)
        coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * win - 1) + rel[..., 1]), persistent=False)
        self.scale = DH ** -0.5

    def forward(self, x, shift_mask):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, HEADS, DH).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        attn = attn.view(-1, self.nw, HEADS, n, n) + shift_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, HEADS, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class FoldedViewMask(Heads):
    """Older HF models: bmm scores [B*H,S,S] -> view [B,H,S,S] + mask -> view back -> softmax -> bmm."""

    def forward(self, x, add_mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, DH).transpose(1, 2).reshape(b * HEADS, s, DH) * DH ** -0.5
        k = self.k(x).view(b, s, HEADS, DH).transpose(1, 2).reshape(b * HEADS, s, DH)
        v = self.v(x).view(b, s, HEADS, DH).transpose(1, 2).reshape(b * HEADS, s, DH)
        w = torch.bmm(q, k.transpose(1, 2))
        w = w.view(b, HEADS, s, s) + add_mask
        w = w.view(b * HEADS, s, s)
        w = F.softmax(w, dim=-1)
        o = torch.bmm(w, v).view(b, HEADS, s, DH)
        return self.merge(o)


class AmaxStabilized(Heads):
    """Subtracting the row max is softmax-invariant: dropped."""

    def forward(self, x):
        q, k, v = self.split(x)
        a = q @ k.transpose(-1, -2) * DH ** -0.5
        a = a - a.amax(dim=-1, keepdim=True).detach()
        return self.merge(a.softmax(-1) @ v)


class InplaceOps(Heads):
    """``*=`` and a discarded in-place ``masked_fill_`` on the scores."""

    def forward(self, x, block):
        q, k, v = self.split(x)
        a = q @ k.transpose(-1, -2)
        a *= DH ** -0.5
        a.masked_fill_(block, float("-inf"))
        return self.merge(a.softmax(-1) @ v)


class FullDivisor(Heads):
    """GPT-2 style: divide by torch.full([], sqrt(d))."""

    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.matmul(q, k.transpose(-1, -2))
        a = a / torch.full([], v.size(-1) ** 0.5, dtype=a.dtype, device=a.device)
        a = nn.functional.softmax(a, dim=-1).type(v.dtype)
        return self.merge(torch.matmul(a, v))


class SingleHead3D(nn.Module):
    """No head axis at all: [B, S, D] @ [B, D, S]."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D_MODEL), dim=-1) @ v


class DropoutModuleEval(Heads):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(self.drop(self.sm(q @ k.transpose(-1, -2) * DH ** -0.5)) @ v)


class KeyPermute0231(nn.Module):
    """Old GPT-2: keys permuted straight to [B, H, D, S] with permute(0, 2, 3, 1); q pre-divided."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(D_MODEL, dim=2)
        q = q.view(b, s, HEADS, DH).permute(0, 2, 1, 3) / math.sqrt(DH)
        k = k.view(b, s, HEADS, DH).permute(0, 2, 3, 1)
        v = v.view(b, s, HEADS, DH).permute(0, 2, 1, 3)
        w = nn.Softmax(dim=-1)(torch.matmul(q, k))
        return torch.matmul(w, v).permute(0, 2, 1, 3).contiguous().view(b, s, D_MODEL)


class KitchenSink(Heads):
    """Everything at once: GQA repeat_kv, scale on k, additive bias, key padding, causal where, fp32 softmax,
    einsum with v as the first operand."""

    def __init__(self):
        super().__init__(hk=2, dv=12)
        self.pos = nn.Parameter(torch.randn(HEADS, S, S) * 0.3)

    def forward(self, x, keep, causal):
        q, k, v = self.split(x)
        k, v = repeat_kv(k * DH ** -0.5, 2), repeat_kv(v, 2)
        a = torch.matmul(q, k.transpose(-1, -2)) + self.pos
        a = a.masked_fill(keep == 0, -1e9)
        a = torch.where(causal, a, torch.finfo(a.dtype).min) * 2.0
        p = F.softmax(a, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.einsum("bhkd,bhqk->bhqd", v, p))


# ------------------------------------------------------------------------------------------------ negatives

class ReturnsWeights(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        w = (q @ k.transpose(-1, -2) * DH ** -0.5).softmax(-1)
        return self.merge(w @ v), w


class SoftCapTanh(Heads):
    """Gemma 2's logit soft-capping, then a causal mask: the op's ``softcap``."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        a = q @ k.transpose(-1, -2) * (4 * DH ** -0.5)
        a = torch.tanh(a / 2.0) * 2.0
        return self.merge((a + mask).softmax(-1) @ v)


class SoftCapAfterBias(Heads):
    """tanh of scores that already carry a bias: not the op's ``softcap`` (which caps before the bias)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        a = torch.tanh((q @ k.transpose(-1, -2) * DH ** -0.5 + mask) / 5.0) * 5.0
        return self.merge(a.softmax(-1) @ v)


class LearnedTemperature(Heads):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge((q @ k.transpose(-1, -2) * self.temperature).softmax(-1) @ v)


class TrainingDropout(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        w = F.dropout((q @ k.transpose(-1, -2) * DH ** -0.5).softmax(-1), p=0.2, training=True)
        return self.merge(w @ v)


class HeadMaskAfterSoftmax(Heads):
    def forward(self, x, head_mask):
        q, k, v = self.split(x)
        w = (q @ k.transpose(-1, -2) * DH ** -0.5).softmax(-1) * head_mask
        return self.merge(w @ v)


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_MODEL, 10)

    def forward(self, x):
        return self.fc(x.mean(1)).softmax(-1)


class MoERouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.randn(D_MODEL, 4))
        self.experts = nn.Parameter(torch.randn(4, D_MODEL, D_MODEL) * 0.1)

    def forward(self, x):
        gates = (x @ self.router).softmax(-1)                     # [B, S, E]
        w, idx = gates.topk(2, dim=-1)
        outs = torch.einsum("bsd,edf->bsef", x, self.experts)     # [B, S, E, D]
        picked = outs.gather(2, idx[..., None].expand(-1, -1, -1, D_MODEL))
        return (picked * w[..., None]).sum(2)


class SoftmaxOverQueries(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge((q @ k.transpose(-1, -2)).softmax(dim=-2) @ v)


# ------------------------------------------------------------------------------------------------ cases

B, S, SK = 2, 7, 5


def _x(s=S):
    return torch.randn(B, s, D_MODEL)


def _causal(s=S):
    return torch.tril(torch.ones(s, s, dtype=torch.bool))


def _add_mask():
    m = torch.zeros(B, 1, S, S)
    m[0, :, :, -2:] = torch.finfo(torch.float32).min
    return m


def _keep():
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[1, ..., -3:] = False
    return keep


def _swin_inputs():
    x = torch.randn(2 * 4, 9, D_MODEL)
    shift = torch.zeros(4, 9, 9)
    shift[1:, :4, 5:] = -100.0
    shift[1:, 5:, :4] = -100.0
    return (x, shift)


def _pad_bias():
    bias = torch.zeros(B, 1, S)
    bias[1, 0, -2:] = -1e9
    return bias


# (id, factory, inputs factory, expected sites rewritten, expected form)
POSITIVE = [
    ("matmul-transpose-mul", MatmulTransposeMul, lambda: (_x(),), "matmul"),
    ("tanh-softcap-then-mask", SoftCapTanh, lambda: (_x(), _add_mask()), "matmul"),
    ("torch.matmul-mT-div-sqrt", TorchMatmulMTDivSqrt, lambda: (_x(),), "matmul"),
    ("method-matmul-permute-two-scales", MethodMatmulPermute, lambda: (_x(),), "matmul"),
    ("scale-on-q-dropout-eval", ScaleOnQ, lambda: (_x(),), "matmul"),
    ("scale-on-q-and-k-einsum", ScaleOnQAndK, lambda: (_x(),), "einsum"),
    ("bmm-heads-folded", BmmFolded, lambda: (_x(),), "bmm"),
    ("baddbmm-beta0-diffusers", BaddbmmBeta0, lambda: (_x(),), "baddbmm"),
    ("baddbmm-bias-beta-alpha", BaddbmmBias, lambda: (_x(), _pad_bias()), "baddbmm"),
    ("einsum-bhqd", EinsumBHSD, lambda: (_x(),), "einsum"),
    ("einsum-bshd-letters", EinsumBSHD, lambda: (_x(),), "einsum"),
    ("einsum-ellipsis", EinsumEllipsis, lambda: (_x(),), "einsum"),
    ("causal-tril-buffer-eq0", CausalTrilBuffer, lambda: (_x(),), "matmul"),
    ("key-padding-finfo-min", KeyPaddingFinfoMin, lambda: (_x(), _keep()), "matmul"),
    ("where-mask-inf", WhereMask, lambda: (_x(), _causal()), "matmul"),
    ("bias-before-scale", BiasBeforeScale, lambda: (_x(),), "matmul"),
    ("hf-eager-float-mask-fp32-softmax", HFEagerFloatMask, lambda: (_x(), _add_mask()), "matmul"),
    ("gqa-repeat-kv-causal", GQARepeatKV, lambda: (_x(), _causal()), "matmul"),
    ("gqa-repeat-interleave-dv12", GQARepeatInterleave, lambda: (_x(),), "matmul"),
    ("mqa-broadcast", MQABroadcast, lambda: (_x(),), "matmul"),
    ("cross-attn-sq7-sk5-dv12", CrossAttnDv, lambda: (_x(), _x(SK)), "matmul"),
    ("swin-window-relpos-shift", SwinWindow, _swin_inputs, "matmul"),
    ("folded-view-mask", FoldedViewMask, lambda: (_x(), _add_mask()), "bmm"),
    ("amax-stabilized", AmaxStabilized, lambda: (_x(),), "matmul"),
    ("inplace-imul-masked-fill_", InplaceOps, lambda: (_x(), ~_causal()), "matmul"),
    ("gpt2-full-divisor", FullDivisor, lambda: (_x(),), "matmul"),
    ("single-head-3d", SingleHead3D, lambda: (_x(),), "matmul"),
    ("nn-dropout-softmax-modules-eval", DropoutModuleEval, lambda: (_x(),), "matmul"),
    ("gpt2-old-key-permute0231", KeyPermute0231, lambda: (_x(),), "matmul"),
    ("kitchen-sink-gqa-bias-pad-causal-einsum-v-first", KitchenSink,
     lambda: (_x(), _keep().long(), _causal()), "matmul"),
]

# (id, factory, inputs factory, expected reported sites, expected words in the reason)
NEGATIVE = [
    ("returns-weights", ReturnsWeights, lambda: (_x(),), 1, "also used"),
    ("tanh-after-bias", SoftCapAfterBias, lambda: (_x(), _add_mask()), 1, "already carry a bias"),
    ("learned-temperature", LearnedTemperature, lambda: (_x(),), 1, "non-constant scale"),
    ("dropout-training", TrainingDropout, lambda: (_x(),), 1, "training"),
    ("head-mask-after-softmax", HeadMaskAfterSoftmax, lambda: (_x(), torch.rand(1, HEADS, 1, 1)), 1, "mul"),
    # not attention: no site, but the softmax is listed with its reason (none is left alone silently)
    ("classifier-head", ClassifierHead, lambda: (_x(),), 0, "reaches no `p @ v`"),
    ("moe-router", MoERouter, lambda: (_x(),), 0, "reaches no `p @ v`"),
    ("softmax-over-queries", SoftmaxOverQueries, lambda: (_x(),), 0, "not the last"),
]


def _run(model, inputs, compile_with=None):
    """Output and gradients (inputs and parameters) of ``model`` (or its compiled form) on ``inputs``."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    fn = model if compile_with is None else torch.compile(model, backend=compile_with, fullgraph=True)
    torch.manual_seed(1)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    grads = [t.grad for t in inputs if t.requires_grad] + [p.grad for p in model.parameters()]
    grads = [None if gr is None else gr.detach() for gr in grads]
    model.zero_grad(set_to_none=True)
    return list(outs), grads


def _check_close(model, inputs, backend):
    golden_model = copy.deepcopy(model).double()
    g_out, g_grads = _run(golden_model, [t.double() if t.is_floating_point() else t for t in inputs])
    e_out, e_grads = _run(model, inputs)
    c_out, c_grads = _run(model, inputs, backend)
    for i, (c, e, g) in enumerate(zip(c_out, e_out, g_out)):
        assert_close_to_golden(c.detach(), g.detach(), e.detach(), name=f"output {i}")
    assert len(c_grads) == len(g_grads)
    for i, (c, e, g) in enumerate(zip(c_grads, e_grads, g_grads)):
        if c is None:  # a term the softmax ignores (constant along keys) was dropped: its gradient is zero
            assert g is None or float(g.abs().max()) < 1e-9, f"gradient {i} missing"
            continue
        assert_close_to_golden(c.detach(), g, e.detach(), name=f"gradient {i}")


@pytest.mark.parametrize("factory,make_inputs,form", [p[1:] for p in POSITIVE], ids=[p[0] for p in POSITIVE])
def test_manual_site_rewritten(factory, make_inputs, form):
    model = factory().eval()
    inputs = make_inputs()
    locattn.reset_counters()
    backend = Recording(inductor=False)
    _check_close(model, inputs, backend)
    assert [d.rewritten for d in backend.decisions] == [True], [d.reason for d in backend.decisions]
    site = backend.decisions[0].site
    assert site.form == form
    assert site.replaced, "a manual site names the nodes it replaces"
    assert locattn.counters()["rewrite"] == {form: 1}
    code = backend.codes[0]
    assert "locattn.attention" in code
    assert "softmax" not in code
    assert "matmul" not in code and "bmm" not in code and "einsum" not in code


def test_swin_site_record():
    """Swin's window attention: heads, bias shape and the shift mask folded into one float bias."""
    backend = Recording(inductor=False)
    model = SwinWindow().eval()
    torch.compile(model, backend=backend)(*_swin_inputs())
    (d,) = backend.decisions
    s = d.site
    assert s.q_shape == (8, HEADS, 9, DH) and s.k_shape == (8, HEADS, 9, DH)
    assert s.bias is not None and s.bias_shape == (8, HEADS, 9, 9)
    assert s.scale == pytest.approx(DH ** -0.5)


def test_folded_layout_recovers_heads():
    backend = Recording(inductor=False)
    torch.compile(BaddbmmBeta0().eval(), backend=backend)(_x())
    s = backend.decisions[0].site
    assert (s.batch, s.heads, s.s_q, s.head_dim) == (B, HEADS, S, DH)
    assert s.layout == "(BH)SD"


class FoldedBmm(Heads):
    """``[B, S, H*D]`` folded into ``[B*H, S, D]`` (``head_major=False``) or ``[H*B, S, D]`` (``True``: heads
    outer, as ``permute(2, 0, 1, 3)`` gives), bmm attention, unfolded back the same way."""

    def __init__(self, head_major: bool):
        super().__init__()
        self.head_major = head_major

    def forward(self, x):
        b, s, _ = x.shape
        order = (2, 0, 1, 3) if self.head_major else (0, 2, 1, 3)

        def fold(t):
            return t.view(b, s, HEADS, DH).permute(*order).reshape(-1, s, DH)

        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        o = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * DH ** -0.5, dim=-1), v)
        o = o.view(HEADS, b, s, DH).permute(1, 2, 0, 3) if self.head_major else o.view(b, HEADS, s, DH).transpose(1, 2)
        return self.o(o.reshape(b, s, HEADS * DH))


@pytest.mark.parametrize("head_major", [False, True], ids=["batch-major", "head-major"])
def test_folded_layout_heads_proven_from_the_graph(head_major):
    """Heads are recovered from a ``[B*H]`` fold only when the graph shows which axis they came from: a head-major
    fold keeps them folded into the batch (exact), and a per-head rule then names the reason instead of applying
    to batch elements."""
    model = FoldedBmm(head_major).eval()
    backend = Recording(inductor=False)
    _check_close(model, (_x(),), backend)
    s = backend.decisions[0].site
    if head_major:
        assert (s.batch, s.heads) == (B * HEADS, 1) and "head-major" in s.notes[0]
    else:
        assert (s.batch, s.heads) == (B, HEADS) and not s.notes
    torch._dynamo.reset()
    per_head = {"rule": [{"match": "*", "heads": [0, 1], "pattern": "sliding_window", "window": 2}]}
    if head_major:
        with pytest.raises(Exception, match=r"heads \[1\] do not exist .*it has 1 heads; a head-major fold"):
            locattn.explain(model, _x(), policy=per_head)
    else:
        assert locattn.explain(model, _x(), policy=per_head).decisions[0].spec.groups[0].heads == (0, 1)


def test_gqa_passes_unrepeated_kv():
    backend = Recording(inductor=False)
    torch.compile(GQARepeatKV().eval(), backend=backend)(_x(), _causal())
    s = backend.decisions[0].site
    assert s.kv_heads == 2 and s.heads == HEADS and s.enable_gqa
    assert "expand" not in backend.codes[0] and "repeat" not in backend.codes[0]


def test_scale_folds_every_factor():
    make = {p[1]: p[2] for p in POSITIVE}
    for factory, expected in [(ScaleOnQAndK, DH ** -0.5), (MethodMatmulPermute, 0.5 * 2 * DH ** -0.5),
                              (BaddbmmBias, 0.3), (FullDivisor, DH ** -0.5), (KeyPermute0231, DH ** -0.5),
                              (KitchenSink, 2 * DH ** -0.5)]:
        torch._dynamo.reset()
        backend = Recording(inductor=False)
        torch.compile(factory().eval(), backend=backend)(*make[factory]())
        assert backend.decisions[0].site.scale == pytest.approx(expected), factory.__name__


@pytest.mark.parametrize("factory,make_inputs,n_sites,why", [n[1:] for n in NEGATIVE], ids=[n[0] for n in NEGATIVE])
def test_negative_left_alone(factory, make_inputs, n_sites, why):
    model = factory().eval()
    inputs = make_inputs()
    locattn.reset_counters()
    backend = Recording(inductor=False)
    _check_close(model, inputs, backend)
    assert locattn.counters().get("rewrite", {}) == {}
    assert len(backend.decisions) == n_sites
    for d in backend.decisions:
        assert not d.rewritten and why in d.reason, d.reason
    assert "locattn.attention" not in backend.codes[0]
    if not n_sites:
        assert [why in x.reason for x in backend.softmax_left] == [True], backend.softmax_left
        assert sum(locattn.counters()["softmax_left"].values()) == 1
    report = locattn.explain(factory().eval(), *make_inputs())
    assert why in str(report) and "left alone" in str(report)


@pytest.mark.parametrize("factory,make_inputs", [(GQARepeatKV, lambda: (_x(), _causal())),
                                                 (SwinWindow, _swin_inputs)], ids=["gqa", "swin"])
def test_manual_with_inductor(factory, make_inputs):
    model = factory().eval()
    backend = Recording(inductor=True)
    _check_close(model, make_inputs(), backend)
    assert [d.rewritten for d in backend.decisions] == [True]
    assert locattn.counters()["rewrite"] == {backend.decisions[0].site.form: 1}


def test_two_sites_in_one_graph_share_inputs():
    """Two attentions reading the same q/k/v: both rewritten, nothing erased that the other needs."""

    class Two(Heads):
        def forward(self, x):
            q, k, v = self.split(x)
            q = q * DH ** -0.5
            a = (q @ k.transpose(-1, -2)).softmax(-1) @ v
            b = (q @ k.transpose(-1, -2) + 1.0).softmax(-1) @ v
            return self.merge(a + b)

    backend = Recording(inductor=False)
    _check_close(Two().eval(), (_x(),), backend)
    assert [d.rewritten for d in backend.decisions] == [True, True]


DYNAMIC = [MatmulTransposeMul, GQARepeatKV, EinsumBSHD, SingleHead3D, KeyPaddingFinfoMin, InplaceOps]


@pytest.mark.parametrize("factory", DYNAMIC, ids=[f.__name__ for f in DYNAMIC])
def test_dynamic_shapes_no_baked_sizes(factory):
    """dynamic=True: the rewritten graph serves two sequence lengths without recompiling."""
    model = factory().eval()
    backend = Recording(inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for s in (S, 11):
        extra = {GQARepeatKV: lambda: (_causal(s),), KeyPaddingFinfoMin: lambda: (torch.rand(B, 1, 1, s) > 0.3,),
                 InplaceOps: lambda: (~_causal(s),)}.get(factory, lambda: ())()
        inputs = (_x(s), *extra)
        with torch.no_grad():
            err = float((compiled(*inputs) - model(*inputs)).abs().max())
        assert err < 1e-5
    assert len(backend.codes) == 1 and [d.rewritten for d in backend.decisions] == [True]


def test_dynamic_folded_layout_is_reported():
    """A [B*H, S, D] layout under dynamic shapes would need baked sizes: left alone, with the reason."""
    backend = Recording(inductor=False)
    model = BmmFolded().eval()
    x = _x()
    with torch.no_grad():
        assert float((torch.compile(model, backend=backend, dynamic=True)(x) - model(x)).abs().max()) < 1e-5
    (d,) = backend.decisions
    assert not d.rewritten and "dynamic shapes" in d.reason


BF16 = [MatmulTransposeMul, BaddbmmBeta0, HFEagerFloatMask, SwinWindow, KitchenSink]


@pytest.mark.parametrize("factory", BF16, ids=[f.__name__ for f in BF16])
def test_bf16_forward(factory):
    """bf16: as accurate as eager bf16 against the fp64 golden; the output keeps the model's dtype."""
    make = {p[1]: p[2] for p in POSITIVE}[factory]
    model, inputs = factory().eval(), make()
    golden = copy.deepcopy(model).double()(*[t.double() if t.is_floating_point() else t for t in inputs])
    model = model.bfloat16()
    inputs = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    backend = Recording(inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
        eager = model(*inputs)
    assert [d.rewritten for d in backend.decisions] == [True]
    assert out.dtype == torch.bfloat16
    assert_close_to_golden(out, golden.detach(), eager)


def test_site_output_feeds_next_site():
    """The second attention's q/k/v are (a scaled view of) the first one's output, with no op in between."""

    class Chained(Heads):
        def forward(self, x):
            q, k, v = self.split(x)
            o = (q @ k.transpose(-1, -2) * DH ** -0.5).softmax(-1) @ v
            o2 = o * 0.5
            return self.merge(((o2 @ o2.transpose(-1, -2)) * DH ** -0.5).softmax(-1) @ o)

    backend = Recording(inductor=False)
    _check_close(Chained().eval(), (_x(),), backend)
    assert [d.rewritten for d in backend.decisions] == [True, True]
    assert backend.decisions[1].site.scale == pytest.approx(0.25 * DH ** -0.5)
