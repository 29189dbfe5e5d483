"""Real models from tiny random configs: every attention site is found, in SDPA and hand-written form alike.

For each model and form: the number of sites ``locattn.explain`` reports (all rewritten under the default
dense policy, unless the case is a negative one) and compiled == eager. The graphs run eagerly after the
rewrite (``inductor=False``) to keep the file fast; two models also go through Inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import locattn

pytestmark = pytest.mark.models


def _close(actual, expected, name=""):
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol, f"{name}: compiled differs from eager by {err:.3g} (tolerance {tol:.3g})"


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


# ------------------------------------------------------------------------------------------------ diffusers

def _diffusers_case(name: str):
    D = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if name == "DiT":
        m = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                                    sample_size=16, patch_size=2, norm_num_groups=8)
        x = dict(hidden_states=torch.randn(2, 4, 16, 16), timestep=torch.tensor([3, 5]),
                 class_labels=torch.tensor([1, 2]))
    elif name == "PixArt":
        m = D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                       num_layers=1, cross_attention_dim=32, caption_channels=32, sample_size=16,
                                       norm_num_groups=8, use_additional_conditions=False)
        keep = torch.ones(2, 7)
        keep[1, -3:] = 0
        x = dict(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 7, 32),
                 timestep=torch.tensor([3, 5]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                 encoder_attention_mask=keep)
    elif name == "SD3":
        m = D.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                    pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
        x = dict(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 7, 32),
                 pooled_projections=torch.randn(2, 32), timestep=torch.tensor([3, 5]))
    elif name == "FLUX":
        m = D.FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                     axes_dims_rope=(4, 6, 6))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        x = dict(hidden_states=torch.randn(2, 64, 16), encoder_hidden_states=torch.randn(2, 7, 32),
                 pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.5]),
                 img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3))
    elif name == "CogVideoX":
        m = D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                          time_embed_dim=32, text_embed_dim=32, num_layers=1, sample_width=16,
                                          sample_height=16, sample_frames=5, patch_size=2, max_text_seq_length=7)
        x = dict(hidden_states=torch.randn(1, 2, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32),
                 timestep=torch.tensor([3]))
    elif name == "Wan":
        m = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                    rope_max_seq_len=64)
        x = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), timestep=torch.tensor([3]),
                 encoder_hidden_states=torch.randn(1, 7, 32))
    elif name == "HunyuanVideo":
        m = D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                             patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                                             rope_axes_dim=(4, 6, 6), guidance_embeds=False)
        keep = torch.ones(1, 7)
        keep[0, -3:] = 0
        x = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), timestep=torch.tensor([3]),
                 encoder_hidden_states=torch.randn(1, 7, 32), encoder_attention_mask=keep,
                 pooled_projections=torch.randn(1, 32))
    else:
        raise KeyError(name)
    return m.eval(), x


def _classic(model) -> int:
    """Swap every ``AttnProcessor2_0`` (SDPA) for the classic ``AttnProcessor`` (baddbmm/softmax/bmm)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    n = 0
    for mod in model.modules():
        if isinstance(mod, Attention) and isinstance(mod.processor, AttnProcessor2_0):
            mod.set_processor(AttnProcessor())
            n += 1
    return n


# (model, form, sites, site form)
DIFFUSERS = [
    ("DiT", "sdpa", 1, "sdpa"), ("DiT", "classic", 1, "baddbmm"),
    ("PixArt", "sdpa", 2, "sdpa"), ("PixArt", "classic", 2, "baddbmm"),
    ("SD3", "sdpa", 1, "sdpa"), ("FLUX", "sdpa", 2, "sdpa"), ("CogVideoX", "sdpa", 1, "sdpa"),
    ("Wan", "sdpa", 2, "sdpa"), ("HunyuanVideo", "sdpa", 3, "sdpa"),
]


def _check_model(model, inputs, n_sites, form, inductor=False, rewritten=None):
    report = locattn.explain(model, **inputs)
    assert len(report.decisions) == n_sites, str(report)
    assert [d.site.form for d in report.decisions] == [form] * n_sites, str(report)
    want = n_sites if rewritten is None else rewritten
    assert len(report.rewritten) == want, str(report)
    backend = locattn.backend(inductor=inductor)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        _close(_first(compiled(**inputs)), _first(model(**inputs)), "output")
    return report


@pytest.mark.parametrize("name,form,n_sites,site_form", DIFFUSERS, ids=[f"{d[0]}-{d[1]}" for d in DIFFUSERS])
def test_diffusers(name, form, n_sites, site_form):
    model, inputs = _diffusers_case(name)
    if form == "classic":
        assert _classic(model) == n_sites
    report = _check_model(model, inputs, n_sites, site_form)
    if name == "HunyuanVideo":   # the text key-padding mask must reach the op of the joint attentions
        joint = [d.site for d in report.decisions if "refiner" not in d.site.path]
        assert joint and all(s.mask is not None and s.mask_shape[-1] == s.s_k for s in joint)
    if name == "PixArt" and form == "classic":   # cross-attention mask recovered as a per-head float bias
        cross = report.decisions[1].site
        assert cross.s_q != cross.s_k and cross.bias_shape == (2, 2, 1, 7) and cross.heads == 2


def test_diffusers_classic_with_inductor():
    model, inputs = _diffusers_case("PixArt")
    _classic(model)
    _check_model(model, inputs, 2, "baddbmm", inductor=True)


# ------------------------------------------------------------------------------------------------ transformers

def _hf_case(name: str, impl: str):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 33))
    if name == "GPT2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                           eos_token_id=0)
        m, x = T.GPT2LMHeadModel, dict(input_ids=ids, use_cache=False)
    elif name == "Llama":
        cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=128)
        m, x = T.LlamaForCausalLM, dict(input_ids=ids, use_cache=False)
    elif name == "Gemma3":
        cfg = T.Gemma3TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, intermediate_size=128, vocab_size=128, sliding_window=8,
                                 layer_types=["sliding_attention", "full_attention"])
        m, x = T.Gemma3ForCausalLM, dict(input_ids=ids, use_cache=False)
    elif name == "BERT":
        cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128)
        keep = torch.ones(2, 33, dtype=torch.long)
        keep[1, -5:] = 0
        m, x = T.BertModel, dict(input_ids=ids, attention_mask=keep)
    elif name == "Gemma2":
        cfg = T.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, intermediate_size=128, vocab_size=128, sliding_window=8,
                             attn_logit_softcapping=2.0, query_pre_attn_scalar=4)   # a cap that bites
        m, x = T.Gemma2ForCausalLM, dict(input_ids=ids, use_cache=False)
    elif name == "BLOOM":
        cfg = T.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=128)
        keep = torch.ones(2, 33, dtype=torch.long)
        keep[1, -5:] = 0
        m, x = T.BloomForCausalLM, dict(input_ids=ids, attention_mask=keep, use_cache=False)
    elif name == "ViT":
        cfg = T.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8)
        m, x = T.ViTModel, dict(pixel_values=torch.randn(2, 3, 32, 32))
    else:
        raise KeyError(name)
    cfg._attn_implementation = impl
    model = m(cfg).eval()
    model.set_attn_implementation(impl)
    return model, x


HF = [(n, impl) for n in ("GPT2", "Llama", "Gemma3", "BERT", "ViT") for impl in ("sdpa", "eager")]


@pytest.mark.parametrize("name,impl", HF, ids=[f"{n}-{i}" for n, i in HF])
def test_transformers(name, impl):
    model, inputs = _hf_case(name, impl)
    report = _check_model(model, inputs, 2, "sdpa" if impl == "sdpa" else "matmul")
    if impl == "eager" and name in ("Llama", "Gemma3"):
        assert all(d.site.kv_heads == 2 and d.site.heads == 4 for d in report.decisions), "GQA un-repeated"
    if name in ("Llama", "Gemma3"):   # the [B, 1, S, S] mask built from position comparisons is proven causal
        assert all(d.site.is_causal and d.site.mask_desc.endswith("+causal") for d in report.decisions), str(report)


def test_bloom_alibi_baddbmm():
    """BLOOM (eager only): ALiBi as the input of ``alibi.baddbmm(batch1=q, batch2=kᵀ, beta=, alpha=)`` on a
    ``[B*H, S, D]`` fold, a float causal + padding mask, fp32 softmax, bmm. Both sites rewritten, heads recovered
    (they were not found at all: keyword batch1/batch2)."""
    model, inputs = _hf_case("BLOOM", "eager")
    report = _check_model(model, inputs, 2, "baddbmm")
    assert all(d.site.heads == 4 and d.site.batch == 2 and d.site.bias is not None for d in report.decisions)


def test_gemma2_softcap_is_a_score_modifier():
    """Gemma 2's tanh logit soft-capping (eager): both sites rewritten with the op's ``softcap`` (they were left
    alone), GQA un-repeated, compiled == eager."""
    model, inputs = _hf_case("Gemma2", "eager")
    report = _check_model(model, inputs, 2, "matmul")
    assert all(d.site.softcap == 2.0 and d.spec.softcap == 2.0 and d.site.kv_heads == 2 for d in report.decisions)


def test_llama_eager_returned_attentions_left_alone():
    """output_attentions=True returns the probabilities: reported, not rewritten, still correct."""
    model, inputs = _hf_case("Llama", "eager")
    inputs = dict(inputs, output_attentions=True)
    report = _check_model(model, inputs, 2, "matmul", rewritten=0)
    assert all("also used" in d.reason for d in report.decisions)


def test_llama_eager_with_inductor_training():
    """Inductor, forward and backward, through the manual GQA site."""
    model, inputs = _hf_case("Llama", "eager")
    ref = copy.deepcopy(model)
    locattn.reset_counters()
    compiled = torch.compile(model, backend=locattn.backend())
    loss_c = compiled(**inputs).logits.float().pow(2).mean()
    loss_c.backward()
    loss_e = ref(**inputs).logits.float().pow(2).mean()
    loss_e.backward()
    assert locattn.counters()["rewrite"] == {"matmul": 2}
    _close(loss_c.detach(), loss_e.detach(), "loss")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            _close(p.grad, q.grad, n)


# ------------------------------------------------------------------------------------------------ timm

def _timm():
    try:
        import timm  # noqa: F401
    except Exception as e:  # torchvision's compiled ops may not load beside a CPU torch: see real-models.md
        pytest.skip(f"timm unavailable: {type(e).__name__}: {e}")
    import timm.layers

    return timm


TIMM = [("vit_small_patch16_224", True, 2, "sdpa"), ("vit_small_patch16_224", False, 2, "matmul"),
        ("swin_tiny_patch4_window7_224", False, 4, "matmul")]


@pytest.mark.parametrize("name,fused,n_sites,form", TIMM, ids=["vit-fused", "vit-unfused", "swin"])
def test_timm(name, fused, n_sites, form):
    timm = _timm()
    old = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused)
    try:
        torch.manual_seed(0)
        if name.startswith("swin"):
            kw = dict(img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32)
        else:
            kw = dict(img_size=64, depth=2)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    finally:
        timm.layers.set_fused_attn(old)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    report = locattn.explain(model, x)
    assert len(report.decisions) == n_sites and len(report.rewritten) == n_sites, str(report)
    assert [d.site.form for d in report.decisions] == [form] * n_sites
    if name.startswith("swin"):
        assert all(d.site.path.endswith(".attn") and d.site.bias is not None for d in report.decisions)
        assert report.decisions[1].site.bias_shape == (8, 2, 49, 49)   # shifted block: rel-pos + shift mask
    compiled = torch.compile(model, backend=locattn.backend(inductor=False))
    with torch.no_grad():
        _close(compiled(x), model(x), "output")
