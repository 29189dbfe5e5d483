"""grid = "auto" on packed-latent models (locattn/passes/grid_packed.py), real diffusers / transformers models
from tiny configs with non-square 8x6 latent grids (a swapped H and W would show): the inferred grid equals the
explicit one, runs to the same output, and changed positional ids are caught at run time."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn

pytestmark = pytest.mark.models


def _ids(h, w):
    return torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                      indexing="ij"), -1).reshape(-1, 3)


def packed_case(name: str):
    """``(model, inputs)``: latents of 8x6 tokens (2 frames for video models), 7 text tokens."""
    D = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if name == "FLUX":
        m = D.FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                     axes_dims_rope=(4, 6, 6))
        x = dict(hidden_states=torch.randn(2, 48, 16), encoder_hidden_states=torch.randn(2, 7, 32),
                 pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.5]), img_ids=_ids(8, 6),
                 txt_ids=torch.zeros(7, 3))
    elif name == "Chroma":
        m = D.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                       approximator_hidden_dim=32, approximator_layers=1)
        x = dict(hidden_states=torch.randn(1, 48, 16), encoder_hidden_states=torch.randn(1, 7, 32),
                 timestep=torch.tensor([0.3]), img_ids=_ids(8, 6), txt_ids=torch.zeros(7, 3))
    elif name == "LTX-Video":
        m = D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                         cross_attention_dim=32, num_layers=1, caption_channels=32)
        x = dict(hidden_states=torch.randn(1, 2 * 8 * 6, 8), encoder_hidden_states=torch.randn(1, 7, 32),
                 timestep=torch.tensor([3.0]), encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=8,
                 width=6)
    elif name == "AuraFlow":
        m = D.AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                         num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                         pos_embed_max_size=256)
        x = dict(hidden_states=torch.randn(2, 4, 16, 12), encoder_hidden_states=torch.randn(2, 7, 32),
                 timestep=torch.tensor([3.0, 5.0]))
    elif name == "QwenImage":
        m = D.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          axes_dims_rope=(4, 6, 6))
        x = dict(hidden_states=torch.randn(1, 48, 16), encoder_hidden_states=torch.randn(1, 7, 32),
                 encoder_hidden_states_mask=torch.ones(1, 7), timestep=torch.tensor([0.3]), img_shapes=[(1, 8, 6)])
    elif name == "CogView4":
        m = D.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                         time_embed_dim=32, condition_dim=8, pos_embed_max_size=32, sample_size=16,
                                         rope_axes_dim=(16, 16))
        x = dict(hidden_states=torch.randn(1, 4, 16, 12), encoder_hidden_states=torch.randn(1, 7, 32),
                 timestep=torch.tensor([3]), original_size=torch.tensor([[128.0, 96.0]]),
                 target_size=torch.tensor([[128.0, 96.0]]), crop_coords=torch.tensor([[0.0, 0.0]]))
    elif name == "Cosmos":
        m = D.CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=1, mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8,
                                       max_size=(4, 32, 32), patch_size=(1, 2, 2))
        x = dict(hidden_states=torch.randn(1, 4, 2, 16, 12), timestep=torch.tensor([0.3]),
                 encoder_hidden_states=torch.randn(1, 7, 32), padding_mask=torch.zeros(1, 1, 16, 12))
    elif name == "DINOv2-registers":
        T = pytest.importorskip("transformers")
        cfg = T.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=4, num_register_tokens=4)
        m = T.Dinov2WithRegistersModel(cfg)
        x = dict(pixel_values=torch.randn(1, 3, 32, 24))
    else:
        raise KeyError(name)
    return m.eval(), x


# model -> (grid, prefix, suffix) of its self-attention sites
EXPECTED = {
    "FLUX": ((8, 6), 7, 0),             # text first; grid from img_ids
    "Chroma": ((8, 6), 7, 0),
    "LTX-Video": ((2, 8, 6), 0, 0),     # rotary coordinates built from num_frames/height/width
    "AuraFlow": ((8, 6), 15, 0),        # 8 register tokens + 7 text tokens first; packing chain in the graph
    "QwenImage": ((8, 6), 7, 0),        # rotary table from img_shapes
    "CogView4": ((8, 6), 7, 0),
    "Cosmos": ((2, 8, 6), 0, 0),        # padding-mask channel concatenated before the packing
    "DINOv2-registers": ((8, 6), 5, 0),  # class token + 4 registers spliced in front of the patches
}


def _policy(grid, prefix=None, suffix=None, ndim=2):
    """A 3x3 neighborhood ([1, 3, 3] on video grids) on every site; ``grid`` / globals auto or written out."""
    kernel = [1, 3, 3] if ndim == 3 else [3, 3]
    glob = "auto" if prefix is None else {"prefix": prefix, "suffix": suffix}
    return {"rule": [{"match": "*", "pattern": "neighborhood", "kernel": kernel, "grid": grid, "globals": glob}]}


def _run(model, inputs, policy):
    be = locattn.backend(policy, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(**inputs)
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", getattr(out, "last_hidden_state", out))
    return out, [d for d in be.decisions if d.site.s_q == d.site.s_k]


EXPLICIT = ["FLUX", "LTX-Video", "AuraFlow"]   # also compared with the explicit grid below


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(EXPLICIT)))
def test_auto_grid_on_packed_models(name):
    model, inputs = packed_case(name)
    grid, prefix, suffix = EXPECTED[name]
    _, decisions = _run(model, inputs, _policy("auto", ndim=len(grid)))
    assert decisions
    for d in decisions:
        assert d.site.token_grid == (grid, prefix, suffix), (d.site.path, d.site.token_grid_desc)
        assert d.rewritten and d.spec.groups[0].pattern.name == "neighborhood" and d.density < 1


@pytest.mark.parametrize("name", EXPLICIT)
def test_inferred_grid_equals_the_explicit_grid(name):
    """The auto policy and the same policy with the grid written out give the same spec and the same output;
    the grid with H and W swapped gives another output (so the comparison can fail)."""
    model, inputs = packed_case(name)
    grid, prefix, suffix = EXPECTED[name]
    out_auto, dec_auto = _run(model, inputs, _policy("auto", ndim=len(grid)))
    assert dec_auto and all(d.site.token_grid == (grid, prefix, suffix) and d.density < 1 for d in dec_auto)
    out_explicit, dec_explicit = _run(model, inputs, _policy(list(grid), prefix, suffix, len(grid)))
    assert [d.spec.to_json() for d in dec_auto] == [d.spec.to_json() for d in dec_explicit]
    torch.testing.assert_close(out_auto, out_explicit, rtol=0, atol=0)
    swapped = list(grid[:-2]) + [grid[-1], grid[-2]]
    out_swapped, _ = _run(model, inputs, _policy(swapped, prefix, suffix, len(grid)))
    assert not torch.allclose(out_auto, out_swapped, atol=1e-6)


def test_flux_ids_of_another_shape_are_caught_at_run_time():
    """The grid read from img_ids holds only while the ids stay that enumeration: 6x8 ids with the same token
    count (no recompile) raise instead of silently using the 8x6 grid; the compiled graph then still runs."""
    model, inputs = packed_case("FLUX")
    compiled = torch.compile(model, backend="locattn", options={"policy": _policy("auto")})
    with torch.no_grad():
        first = compiled(**inputs)[0]
        with pytest.raises(RuntimeError, match=r"positional ids input img_ids no longer enumerate the 8x6 token "
                                               r"grid that grid = 'auto' read"):
            compiled(**{**inputs, "img_ids": _ids(6, 8)})
        torch.testing.assert_close(compiled(**inputs)[0], first, rtol=0, atol=0)


def test_ids_that_are_not_a_row_major_grid_give_no_grid():
    """Column-major ids (w varies slowest) are not a row-major enumeration: auto asks for the grid."""
    model, inputs = packed_case("FLUX")
    ids = _ids(6, 8)[:, [0, 2, 1]]        # (0, w, h) order: h fastest
    with pytest.raises(Exception, match=r"no token grid could be inferred for this site[^;]*; give 'grid'.* its 55 "
                                        r"tokens are \[prefix\]\[grid, row-major\]\[suffix\]"):
        _run(model, {**inputs, "img_ids": ids}, _policy("auto"))


class Packer(nn.Module):
    """Patchify in the graph, then one attention: ``order`` = "hw" packs rows first (row-major), "wh" columns
    first (a W-major token order no grid describes)."""

    def __init__(self, order, c=4, d=32, p=2):
        super().__init__()
        self.order, self.p = order, p
        self.proj = nn.Linear(c * p * p, d)
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = x.view(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5) if self.order == "hw" else x.permute(0, 4, 2, 1, 3, 5)
        t = self.proj(x.flatten(3).flatten(1, 2))
        q, k, v = self.qkv(t).view(b, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_packing_chain_proves_the_token_order():
    x = torch.randn(1, 4, 16, 12)
    _, dec = _run(Packer("hw").eval(), {"x": x}, _policy("auto", 0, 0))
    assert dec[0].site.token_grid == ((8, 6), 0, 0)
    with pytest.raises(Exception, match="no token grid could be inferred"):
        _run(Packer("wh").eval(), {"x": x}, _policy("auto", 0, 0))
