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


class PatchAttention(torch.nn.Module):
    """A 2x2 patch embedding of a 12x20 image (a non-square 6x10 grid), tokens flattened in the given order, one
    SDPA self-attention over them."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.embed = torch.nn.Conv2d(3, 16, 2, 2)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, img):
        x = self.embed(img)                                      # [B, 16, 6, 10]
        b = x.shape[0]
        if self.order == "h-major":
            t = x.flatten(2).transpose(1, 2)                     # token h * 10 + w
        elif self.order == "w-major":
            t = x.transpose(2, 3).flatten(2).transpose(1, 2)     # token w * 6 + h
        elif self.order == "w-major-permute":
            t = x.permute(0, 3, 2, 1).reshape(b, 60, 16)         # the same, written as one permute
        else:                                                    # an op the proof does not follow
            t = torch.roll(x.flatten(2), 3, -1).transpose(1, 2)
        q, k, v = (y.view(b, 60, 2, 8).transpose(1, 2) for y in self.qkv(t).chunk(3, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("order,grid", [("h-major", (6, 10)), ("w-major", (10, 6)), ("w-major-permute", (10, 6))])
def test_token_order_proven_non_square(order, grid):
    """The grid follows the token order the graph shows (it used to be the convolution's H x W whatever the
    flatten order: a W-major flatten got the transposed grid, silently wrong neighborhoods)."""
    torch.manual_seed(0)
    model = PatchAttention(order)
    img = torch.randn(2, 3, 12, 20)
    auto = {"default": {"pattern": "neighborhood", "kernel": [3, 5], "grid": "auto"}}
    b = locattn.backend(auto, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=b)(img)
    (d,) = b.decisions
    assert d.site.token_grid == (grid, 0, 0), d.site.token_grid_desc
    assert ("token order" in d.site.token_grid_desc) == (order != "h-major")
    torch._dynamo.reset()
    explicit = {"default": {"pattern": "neighborhood", "kernel": [3, 5], "grid": list(grid)}}
    with torch.no_grad():
        ref = torch.compile(model, backend=locattn.backend(explicit, backend="reference", inductor=False))(img)
    torch.testing.assert_close(out, ref)


def test_token_order_not_proven_names_the_op():
    auto = {"default": {"pattern": "neighborhood", "kernel": 3, "grid": "auto"}}
    with pytest.raises(Exception, match=r"no token grid could be inferred for this site \(the token order is lost "
                                        r"at `roll`"):
        with torch.no_grad():
            torch.compile(PatchAttention("rolled"), backend=locattn.backend(auto, inductor=False))(
                torch.randn(1, 3, 12, 20))
