"""Token-grid inference (grid = "auto", globals = "auto") on real diffusers models built from tiny configs."""

import pytest
import torch

import locattn

pytest.importorskip("diffusers")
from test_models_manual import _diffusers_case  # noqa: E402  (tiny configs shared with the model census)



def auto(ndim):
    kernel = [3, 3] if ndim == 2 else [1, 3, 3]
    # HunyuanVideo's text refiner attends text only: no grid to infer, so it is skipped explicitly
    return {"rule": [{"match": "context_embedder.*", "skip": True},
                     {"match": "*", "pattern": "neighborhood", "kernel": kernel, "grid": "auto", "globals": "auto"}]}


# model -> expected (grid, prefix, suffix) of its self-attention sites (16x16 latents, patch 2 -> 8x8 tokens)
EXPECTED = {
    "DiT": ((8, 8), 0, 0),
    "PixArt": ((8, 8), 0, 0),
    "SD3": ((8, 8), 0, 7),            # joint attention: image first, 7 text tokens last
    "CogVideoX": ((2, 8, 8), 7, 0),   # text first (concatenated inside patch_embed), 2 frames
    "Wan": ((2, 8, 8), 0, 0),
    "HunyuanVideo": ((2, 8, 8), 0, 7),
}


@pytest.mark.models
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_grid_inference_on_diffusers(name):
    model, inputs = _diffusers_case(name)
    grid, prefix, suffix = EXPECTED[name]
    b = locattn.backend(auto(len(grid)), inductor=False)
    with torch.no_grad():
        try:
            torch.compile(model, backend=b)(**inputs)
        except Exception as e:  # a site whose grid cannot be found raises before running
            pytest.fail(f"{name}: {e}")
    self_sites = [d for d in b.decisions if d.site.s_q == d.site.s_k and not d.site.path.startswith("context_embedder")]
    assert self_sites, name
    for d in self_sites:
        assert d.site.token_grid == (grid, prefix, suffix), (d.site.path, d.site.token_grid_desc)
        assert d.rewritten and d.spec.groups[0].pattern.name == "neighborhood", d.reason


@pytest.mark.models
def test_flux_auto_grid_comes_from_img_ids():
    """FLUX packs its latents before the model: the grid comes from img_ids (passes/grid_packed.py, whose tests
    cover the packed-latent models)."""
    model, inputs = _diffusers_case("FLUX")
    b = locattn.backend(auto(2), inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=b)(**inputs)
    assert [d.site.token_grid for d in b.decisions] == [((8, 8), 7, 0)] * 2


@pytest.mark.models
@pytest.mark.parametrize("name", ["SD3", "CogVideoX"])
def test_neighborhood_with_auto_globals_runs_and_matches_reference(name):
    model, inputs = _diffusers_case(name)
    pol = auto(len(EXPECTED[name][0]))
    with torch.no_grad():
        fast = torch.compile(model, backend=locattn.backend(pol, inductor=False))(**inputs)
        torch._dynamo.reset()
        ref = torch.compile(model, backend=locattn.backend(pol, backend="reference", inductor=False))(**inputs)
    out = lambda o: o[0] if isinstance(o, tuple) else getattr(o, "sample", o)
    torch.testing.assert_close(out(fast), out(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.models
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_grid_inference_on_timm_vit_class_token_first(fused):
    from test_models_manual import _timm

    timm = _timm()
    old = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(fused)
    try:
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=64,
                                  depth=1).eval()
    finally:
        timm.layers.set_fused_attn(old)
    b = locattn.backend(auto(2), inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=b)(torch.randn(1, 3, 64, 64))
    assert [d.site.token_grid for d in b.decisions] == [((4, 4), 1, 0)]
    assert b.decisions[0].rewritten
