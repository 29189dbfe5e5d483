"""The example policies (examples/policies/*.toml) load, and each runs on a tiny random-weight model of its
family: every rule matches a site, grid / globals "auto" resolve, the timestep schedule switches phase without
recompiling. Their windows are sized for production resolutions, so on the tiny models the local patterns' sizes
are shrunk to 1 (same rules, matches, ranges and pattern kinds)."""

import dataclasses
import os
import warnings

import pytest
import torch

import locattn
from locattn.policy import Policy

pytestmark = pytest.mark.models

POLICIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "policies")

# policy file -> (model case, a timestep in the dense range, one outside it)
FAMILIES = {
    "flux.toml": ("FLUX", 0.95, 0.3),
    "sd3.toml": ("SD3", 990.0, 3.0),
    "pixart.toml": ("PixArt", 900.0, 3.0),
    "cogvideox.toml": ("CogVideoX-2", 900.0, 3.0),
    "wan.toml": ("Wan-2", 990.0, 3.0),
    "hunyuanvideo.toml": ("HunyuanVideo", 990.0, 3.0),
    "ltx_video.toml": ("LTX-Video", 990.0, 3.0),
}


def test_every_policy_file_is_tested():
    assert sorted(f for f in os.listdir(POLICIES) if f.endswith(".toml")) == sorted(FAMILIES)


def _case(name):
    D = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if name == "CogVideoX-2":   # two blocks: the first is kept dense by the policy
        m = D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                          time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=16,
                                          sample_height=16, sample_frames=5, patch_size=2, max_text_seq_length=7)
        return m.eval(), dict(hidden_states=torch.randn(1, 2, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32))
    if name == "Wan-2":
        m = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                    rope_max_seq_len=64)
        return m.eval(), dict(hidden_states=torch.randn(1, 4, 2, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32))
    if name == "LTX-Video":
        from test_grid_packed import packed_case
        m, x = packed_case(name)
    else:
        from test_models_manual import _diffusers_case
        m, x = _diffusers_case(name)
    x.pop("timestep")
    return m, x


def _shrunk(policy: Policy) -> Policy:
    """The same policy with every per-axis size of its local patterns set to 1 (fits any grid)."""
    rules = []
    for r in policy.rules:
        p = r.pattern
        if p is not None and p.local:
            p = dataclasses.replace(p, **{k: 1 for k in ("kernel", "window", "tile") if hasattr(p, k)})
        rules.append(dataclasses.replace(r, pattern=p))
    return dataclasses.replace(policy, rules=tuple(rules))


@pytest.mark.parametrize("fname", sorted(FAMILIES))
def test_example_policy_runs_on_its_family(fname):
    policy = Policy.load(os.path.join(POLICIES, fname))
    assert policy.timestep_rules, "each example keeps its first steps dense"
    case, t_dense, t_sparse = FAMILIES[fname]
    model, inputs = _case(case)
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    be = locattn.backend(_shrunk(policy), inductor=False)
    compiled = torch.compile(model, backend=be)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for t in (t_sparse, t_dense):
            compiled(**inputs, timestep=torch.full((batch,), t))
        be.warn_unmatched()
    unmatched = [str(w.message) for w in caught if "matches no attention site" in str(w.message)]
    assert not unmatched, unmatched
    assert be._graphs == 1                                   # both phases, one compile
    phased = [d for d in be.decisions if d.phases]
    assert phased, "the local rules take some site"
    local = {r.pattern.name for r in policy.rules if r.pattern is not None and r.pattern.local}
    for d in phased:                                         # local outside the range, dense inside it
        names = [pd.spec.groups[0].pattern.name for _, pd in d.phases]
        assert set(names) == {"dense"} | local, (d.site.path, names)
    assert len(locattn.counters()["phase"]) == 2            # one call ran in each phase
