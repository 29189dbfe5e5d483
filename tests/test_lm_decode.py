"""A causal LM generating with a KV cache under a local policy: the decode steps (S_q = 1 < S_k) are windowed
too, not left dense as cross-attention. Compared with an independent reference: the same weights, attention
replaced by an explicitly windowed mask, greedy tokens recomputed without a cache at every step."""

import pytest
import torch

import locattn

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.models

WINDOW, SINKS = 6, 2


def _windowed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Reference attention: query i (the last S_q positions) attends key j iff j <= i and (i - j <= WINDOW or
    j < SINKS). q/k/v: [B, H, S, D] (kv heads repeated here)."""
    s_q, s_k = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    i = torch.arange(s_k - s_q, s_k)[:, None]
    j = torch.arange(s_k)[None, :]
    allowed = (j <= i) & ((i - j <= WINDOW) | (j < SINKS))
    s = (query @ k.transpose(-2, -1)) * scaling
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return (p @ v).transpose(1, 2).contiguous(), None


def _model(impl):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=97, max_position_embeddings=256)
    cfg._attn_implementation = impl
    return T.LlamaForCausalLM(cfg).eval()


def test_generate_under_a_window_policy_windows_the_decode_steps():
    T.AttentionInterface.register("locattn_test_windowed", _windowed_attention)
    ref = _model("locattn_test_windowed")
    model = _model("sdpa")
    model.load_state_dict(ref.state_dict())
    prompt = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    n_new = 10

    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):  # no cache: every step recomputes every position under the windowed mask
            ids = torch.cat([ids, ref(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)

    policy = {"rule": [{"match": "*", "pattern": "sliding_window", "window": WINDOW, "causal": True,
                        "sinks": SINKS}]}
    # the rewritten graphs run eagerly (inductor=False): the decode shapes recompile, Inductor would only add time
    model.forward = torch.compile(model.forward, backend=locattn.backend(policy=policy, inductor=False))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n_new, do_sample=False, use_cache=True)
    assert torch.equal(out, ids)
    # and the dense model disagrees: the window matters at these lengths (the test could fail)
    dense = _model("sdpa")
    dense.load_state_dict(ref.state_dict())
    with torch.no_grad():
        dense_out = dense.generate(prompt, max_new_tokens=n_new, do_sample=False, use_cache=True)
    assert not torch.equal(dense_out, ids)
