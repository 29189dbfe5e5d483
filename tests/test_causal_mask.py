"""Causal masks proven from the graph: the site gets ``is_causal`` (the op skips the blocks above the diagonal)
and keeps its mask, so a mask that is causal *and* something else (padding, a sliding window) loses nothing. A
mask that only looks causal, or whose causality the graph does not show, is not touched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn.backend import LocattnBackend

B, H, S, D = 2, 2, 70, 8


def _scores(q, k):
    return q @ k.transpose(-1, -2) * D ** -0.5


class TrilInForward(nn.Module):
    def forward(self, q, k, v):
        m = torch.tril(torch.ones(S, S))
        return _scores(q, k).masked_fill(m == 0, float("-inf")).softmax(-1) @ v


class TriuBool(nn.Module):
    def forward(self, q, k, v):
        block = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~block)


class AraneCompare(nn.Module):
    """``kv <= q`` from aranges, AND a key-padding mask from the input (the padding must survive)."""

    def forward(self, q, k, v, keep):
        i = torch.arange(S)
        causal = i[None, :] <= i[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal[None, None] & keep[:, None, None, :])


class SlidingCausal(nn.Module):
    """Gemma-style sliding window: ``j <= i`` AND ``j > i - 5``: causal, and the window must survive."""

    def forward(self, q, k, v):
        pos = torch.arange(S)
        qp, kp = pos[:, None], pos[None, :]
        mask = (kp > qp - 5) & (kp <= qp)
        bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        return (_scores(q, k) + bias).softmax(-1) @ v


class TrilBuffer(nn.Module):
    """GPT-2's original causal buffer, sliced to the sequence: proven by value, checked at run time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(96, 96)).view(1, 1, 96, 96))

    def forward(self, q, k, v):
        t = q.shape[-2]
        return _scores(q, k).masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")).softmax(-1) @ v


# negatives: nothing here may be declared causal
class ShiftedByOne(nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None] + 1)   # j <= i + 1


class AntiCausal(nn.Module):
    def forward(self, q, k, v):
        return _scores(q, k).masked_fill(torch.triu(torch.ones(S, S)) == 0, float("-inf")).softmax(-1) @ v


class CausalOrPadding(nn.Module):
    def forward(self, q, k, v, keep):
        i = torch.arange(S)
        mask = (i[None, :] <= i[:, None])[None, None] | keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class InputMask(nn.Module):
    def forward(self, q, k, v, mask):          # causal values, but an input: the graph shows nothing
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TriuOfInput(nn.Module):
    def forward(self, q, k, v, x):             # zeros of triu(x, 1): below the diagonal *and* wherever x is 0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.triu(x, 1) == 0)


class TwoBiasTerms(nn.Module):
    def forward(self, q, k, v, extra):
        i = torch.arange(S)
        bias = torch.where(i[None, :] <= i[:, None], 0.0, -1e9)
        return (_scores(q, k) + bias + extra).softmax(-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def _keep():
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -9:] = False
    return keep


POSITIVE = [("tril-in-forward", TrilInForward, ()), ("triu-bool-negated", TriuBool, ()),
            ("arange-and-padding", AraneCompare, (_keep(),)), ("sliding-window-bias", SlidingCausal, ()),
            ("tril-buffer", TrilBuffer, ())]


def _compile_one(factory, extra):
    """(model, args, compiled output, the one decision) of an uncompiled-Inductor run."""
    model = factory()
    args = (*_qkv(), *extra)
    backend = LocattnBackend(inductor=False)
    out = torch.compile(model, backend=backend)(*args)
    (d,) = backend.decisions
    return model, args, out, d


@pytest.mark.parametrize("name,factory,extra", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_causal_proven_mask_kept(name, factory, extra):
    model, args, out, d = _compile_one(factory, extra)
    assert d.rewritten and d.site.is_causal and any(n.startswith("causal:") for n in d.notes), d.notes
    assert len(d.site.causal_proof.guards) == (name == "tril-buffer")   # only a buffer can change: checked
    assert locattn.counters()["causal_proven"] == {d.site.form: 1}
    torch.testing.assert_close(out, model(*args), rtol=1e-5, atol=1e-6)   # the padding / window parts survive
    assert d.blocks_full + d.blocks_partial == 3 * H      # 2 x 2 blocks of 64: the lower triangle only


@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
def test_buffer_changed_after_compile_raises(inductor):
    model = TrilBuffer()
    compiled = torch.compile(model, backend=LocattnBackend(inductor=inductor))
    torch.testing.assert_close(compiled(*_qkv()), model(*_qkv()), rtol=1e-5, atol=1e-6)
    model.bias.fill_(1.0)                       # no longer causal: the proof no longer holds
    with pytest.raises(Exception, match="proven causal at compile time"):
        compiled(*_qkv())


NEGATIVE = [("shifted-by-one", ShiftedByOne, ()), ("anti-causal-triu", AntiCausal, ()),
            ("causal-or-padding", CausalOrPadding, (_keep(),)),
            ("input-mask", InputMask, (torch.ones(S, S, dtype=torch.bool).tril(),)),
            ("two-bias-terms", TwoBiasTerms, (torch.zeros(S, S),)),
            ("triu-of-input", TriuOfInput, ((torch.rand(S, S) > 0.3).float(),))]


@pytest.mark.parametrize("name,factory,extra", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_not_proven(name, factory, extra):
    model, args, out, d = _compile_one(factory, extra)
    assert d.rewritten and not d.site.is_causal, d.notes
    torch.testing.assert_close(out, model(*args), rtol=1e-5, atol=1e-6)
