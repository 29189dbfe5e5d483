"""Timestep-dependent rules (``timesteps = [lo, hi]``): validation, phases, outputs per phase, no recompiles,
one host decision per model call, mixed batches, training, explain, and CUDA graphs when a GPU is present."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import locattn
from test_backend import SDPA
from locattn.passes.phases import Phases
from locattn.policy import Policy, PolicyError

GRID = (6, 7)


class TinyDenoiser(nn.Module):
    """``forward(x [B, 42, 32], timestep [B])``: a timestep embedding added to the tokens, then two blocks."""

    def __init__(self, d=32, n=2):
        super().__init__()
        self.t_embed = nn.Linear(1, d)
        self.blocks = nn.ModuleList([SDPA(d=d, heads=2, kv_heads=2) for _ in range(n)])

    def forward(self, x, timestep):
        x = x + self.t_embed(timestep.float().view(-1, 1) / 1000)[:, None]
        for blk in self.blocks:
            x = x + blk(x)
        return x


class SigmaDenoiser(TinyDenoiser):
    def forward(self, x, sigma):  # noqa: D102  (the timestep under another name)
        return super().forward(x, sigma)


NA = {"match": "*", "pattern": "neighborhood", "kernel": [3, 3], "grid": list(GRID)}
SW = {"match": "blocks.1", "pattern": "sliding_window", "window": 4}
# dense for t in [800, 1000], a 1-D window for block 1 in [400, 799.5], the neighborhood elsewhere
SCHEDULE = {"rule": [{"match": "*", "timesteps": [800, 1000], "pattern": "dense"},
                     {**SW, "timesteps": [400, 799.5]}, NA]}


def reference_policy(t: float) -> dict:
    """The policy without timesteps that SCHEDULE amounts to at timestep ``t``."""
    if 800 <= t <= 1000:
        return {"default": {"pattern": "dense"}}
    return {"rule": [SW, NA]} if 400 <= t <= 799.5 else {"rule": [NA]}


def _graphs(be):
    """A backend function that records the graphs ``be`` rewrote."""
    seen = []

    def rec(gm, example_inputs):
        out = be(gm, example_inputs)
        seen.append(gm)
        return out

    return rec, seen


def _ops(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr(torch.ops.locattn, name).default]


# ------------------------------------------------------------------------------------------------ policy


def test_policy_round_trip_with_timesteps(tmp_path):
    p = Policy.from_dict(SCHEDULE)
    assert [r.timesteps for r in p.rules] == [(800, 1000), (400, 799.5), None]
    path = tmp_path / "p.toml"
    path.write_text(p.to_toml())
    again = Policy.load(path)
    assert again == p and again.rules[1].timesteps == (400, 799.5) and again.fingerprint() == p.fingerprint()
    assert Policy.from_dict({"rule": [NA]}).fingerprint() != p.fingerprint()


def test_policy_default_takes_no_timesteps():
    with pytest.raises(PolicyError, match=r"\[default\]: key 'timesteps': \[default\] applies outside every range"):
        Policy.from_dict({"default": {"pattern": "dense", "timesteps": [0, 1]}})


def test_same_heads_in_disjoint_timestep_ranges_are_allowed():
    rules = [{"match": "a", "heads": [0], "pattern": "dense", "timesteps": [500, 1000]},
             {"match": "a", "heads": [0], "pattern": "sliding_window", "window": 3, "timesteps": [0, 499]}]
    assert len(Policy.from_dict({"rule": rules}).rules) == 2
    with pytest.raises(PolicyError, match="already taken"):
        Policy.from_dict({"rule": [rules[0], {**rules[1], "timesteps": [500, 1000]}]})


def test_phases_agree_with_the_rule_ranges_at_every_boundary():
    pol = Policy.from_dict({"rule": [{"match": "*", "pattern": "dense", "timesteps": [800, 1000]},
                                     {"match": "*", "pattern": "dense", "timesteps": [500, 500]},
                                     {"match": "*", "pattern": "dense", "timesteps": [0, 800]}]})
    ph = Phases.of(pol)
    assert ph.count == 7
    for t in [-1, 0, 0.5, 499.9, 500, 500.1, 799.9, 800, 800.1, 999, 1000, 1000.1, 5000]:
        k = ph.of_timestep(t)
        # the rules of t's phase are exactly the rules whose range holds t
        assert [r.index for r in ph.policy_for(pol, k).rules] == [r.index for r in pol.rules if r.active_at(t)], t
    assert [ph.label(k) for k in range(ph.count)] == [
        "t < 0", "t in [0, 500)", "t = 500", "t in (500, 800)", "t = 800", "t in (800, 1000]", "t > 1000"]


# ------------------------------------------------------------------------------------------------ compiled


def _compiles() -> tuple[int, int]:
    """Dynamo's counts of frames compiled (first compiles and recompiles) and of graphs produced."""
    c = torch._dynamo.utils.counters
    return c["frames"]["total"], c["stats"]["unique_graphs"]


def _references(model, x, steps) -> list[torch.Tensor]:
    """Each step's output under the policy that holds at its timestep (eager after the rewrite)."""
    out = []
    for t in steps:
        torch._dynamo.reset()
        be = locattn.backend(reference_policy(t), inductor=False)
        out.append(torch.compile(model, backend=be)(x, torch.full((x.shape[0],), t, device=x.device)))
    return out


def test_schedule_matches_each_phase_without_recompiling():
    """20 denoising steps from t=999 to 0 through one Inductor-compiled model: no compile after the warm-up
    call (switching phase never recompiles); every call equals the model compiled with the policy that holds
    at its timestep; the graph decides the phase once per call (one host copy feeding every phased op)."""
    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    x = torch.randn(2, 42, 32)
    be = locattn.backend(SCHEDULE)
    rec, graphs = _graphs(be)
    compiled = torch.compile(model, backend=rec)
    steps = torch.linspace(999, 0, 20).round().tolist()
    with torch.no_grad():
        compiled(x, torch.full((2,), 999.0))              # warm-up: the one compile
        before = _compiles()
        outs = [compiled(x, torch.full((2,), t)) for t in steps]
        assert _compiles() == before and be._graphs == 1 and len(graphs) == 1
        assert locattn.counters()["phase"] == {"3": 2 * 5, "1": 2 * 8, "0": 2 * 8}   # 2 sites per call, warm-up incl.
        for t, out, ref in zip(steps, outs, _references(model, x, steps)):
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=f"t={t}")
    assert len({str(reference_policy(t)) for t in steps}) == 3   # the schedule crossed every phase
    gm = graphs[0]
    phased = _ops(gm, "attention_phased")
    assert len(phased) == 2 and not _ops(gm, "attention")
    host = {n.args[5] for n in phased}
    assert len(host) == 1                                  # one phase tensor for every op of the call ...
    (node,) = host
    assert node.op == "call_method" and node.target == "to" and node.args[1] == "cpu"   # ... copied once


def test_mixed_timesteps_in_a_batch_and_training():
    """Training with a timestep per sample: each batch row runs its own phase, forward and backward, through
    Inductor (the phased op and its backward op)."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    x = torch.randn(3, 42, 32)
    t = torch.tensor([950.0, 600.0, 10.0])
    compiled = torch.compile(model, backend=locattn.backend(SCHEDULE))
    out = compiled(x, t)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = []
    for i in range(3):
        ref_be = locattn.backend(reference_policy(float(t[i])), inductor=False)
        rows.append(torch.compile(model, backend=ref_be)(x[i:i + 1], t[i:i + 1]))
        torch._dynamo.reset()
    ref = torch.cat(rows)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    assert set(locattn.counters()["phase"]) == {"0", "1", "3"}


def test_missing_timestep_input_is_an_error_naming_the_rule():
    model = TinyDenoiser().blocks[0]     # forward(x): no timestep
    with pytest.raises(Exception, match=r"rule #0 \(match=\['\*'\]\): key 'timesteps': site '<root>' depends on the "
                                        r"timestep but its graph has no input named 'timestep'"):
        torch.compile(model, backend=locattn.backend(SCHEDULE, inductor=False))(torch.randn(1, 42, 32))


def test_timestep_arg_option_names_the_input():
    torch.manual_seed(0)
    model = SigmaDenoiser().eval()
    x = torch.randn(1, 42, 32)
    compiled = torch.compile(model, backend="locattn", options={"policy": SCHEDULE, "timestep_arg": "sigma"})
    with torch.no_grad():
        for t in (900.0, 100.0):
            out = compiled(x, torch.tensor([t]))
            ref = torch.compile(model, backend=locattn.backend(reference_policy(t), inductor=False))(x, torch.tensor([t]))
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(Exception, match="no input named 'timestep'"):
        torch._dynamo.reset()
        torch.compile(model, backend=locattn.backend(SCHEDULE, inductor=False))(x, torch.tensor([1.0]))


def test_sites_no_timestep_rule_changes_keep_the_plain_op_and_spec():
    """Adding a timestep rule for block 1 leaves block 0's op and spec string byte-identical."""
    model = TinyDenoiser().eval()
    x, t = torch.randn(1, 42, 32), torch.tensor([500.0])
    specs = []
    for pol in ({"rule": [NA]}, {"rule": [{"match": "blocks.1", "pattern": "dense", "timesteps": [800, 1000]}, NA]}):
        torch._dynamo.reset()
        rec, graphs = _graphs(locattn.backend(pol, inductor=False))
        with torch.no_grad():
            torch.compile(model, backend=rec)(x, t)
        specs.append([n.args[7] for n in _ops(graphs[0], "attention")])
        assert len(_ops(graphs[0], "attention_phased")) == len(pol["rule"]) - 1
    assert len(specs[0]) == 2 and specs[1] == specs[0][:1]


def test_explain_lists_each_sites_phases():
    report = locattn.explain(TinyDenoiser().eval(), torch.randn(1, 42, 32), torch.tensor([500.0]), policy=SCHEDULE)
    text = str(report)
    assert "t in [800, 1000]: dense" in text
    assert "t in [400, 799.5]: sliding_window(window=4)" in text
    rows = report.rows()
    assert [p["timesteps"] for p in rows[1]["phases"]] == ["t < 400", "t in [400, 799.5]", "t in (799.5, 800)",
                                                           "t in [800, 1000]", "t > 1000"]
    assert [p["pattern"].split("(")[0] for p in rows[1]["phases"]] == [
        "neighborhood", "sliding_window", "neighborhood", "dense", "neighborhood"]


def _schedule_file(tmp_path) -> str:
    path = tmp_path / "schedule.toml"
    path.write_text(Policy.from_dict(SCHEDULE).to_toml())
    return str(path)


def test_mode_reduce_overhead_reaches_inductor(monkeypatch, tmp_path):
    """torch.compile(mode=...) cannot be combined with options=: the policy comes from $LOCATTN_POLICY and the
    mode becomes Inductor's settings (reduce-overhead: CUDA graphs), not silently dropped."""
    monkeypatch.setenv("LOCATTN_POLICY", _schedule_file(tmp_path))
    seen = []

    def record(self, gm, example_inputs, **kw):
        seen.append(dict(self.inductor_config))
        return gm.forward

    monkeypatch.setattr(locattn.LocattnBackend, "__call__", record)
    torch.compile(TinyDenoiser().eval(), backend="locattn", mode="reduce-overhead")(torch.randn(1, 42, 32),
                                                                                    torch.tensor([1.0]))
    assert seen == [{"triton.cudagraphs": True}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_schedule_under_cuda_graphs(monkeypatch, tmp_path):
    """mode="reduce-overhead" (CUDA graphs): the phased ops run outside the recorded graphs (Inductor partitions
    around them), so every replay takes its own call's phase; no recompile on switching phase."""
    monkeypatch.setenv("LOCATTN_POLICY", _schedule_file(tmp_path))
    torch.manual_seed(0)
    model = TinyDenoiser().cuda().eval()
    x = torch.randn(2, 42, 32, device="cuda")
    compiled = torch.compile(model, backend="locattn", mode="reduce-overhead")
    steps = torch.linspace(999, 0, 20).round().tolist()
    with torch.no_grad():
        for _ in range(3):   # warm-up and recording
            compiled(x, torch.full((2,), 999.0, device="cuda"))
        before = _compiles()
        outs = [compiled(x, torch.full((2,), t, device="cuda")).clone() for t in steps]
        assert _compiles() == before
        for t, out, ref in zip(steps, outs, _references(model, x, steps)):
            torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3, msg=f"t={t}")


@pytest.mark.parametrize("phase", [[1], [0, 1]], ids=["one-phase", "mixed-batch"])
def test_opcheck_phased(phase):
    """The phased op's schema, fake, autograd and backward op agree with its implementation (one phase for the
    call, and a batch whose rows lie in different phases, with a per-batch bias)."""
    from locattn.ops_phased import phased_specs
    from locattn.patterns import PATTERNS
    from locattn.patterns.spec import DENSE_SPEC, SiteSpec

    window = SiteSpec((dataclasses.replace(DENSE_SPEC.groups[0], pattern=PATTERNS["sliding_window"](window=4)),))
    specs = phased_specs([window.to_json(), DENSE_SPEC.to_json()])
    b = len(phase)
    q, k, v = (torch.randn(b, 2, 33, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(b, 1, 33, 33, requires_grad=True)
    ph = torch.tensor(phase, dtype=torch.int32)
    torch.library.opcheck(torch.ops.locattn.attention_phased.default, (q, k, v, None, bias, ph, 0.2, True, specs, ""))
    out, _ = torch.ops.locattn.attention_phased(q, k, v, None, bias, ph, 0.2, True, specs, "")
    for i, p in enumerate(phase):
        spec = (window if p == 0 else DENSE_SPEC).to_json()
        ref, _ = torch.ops.locattn.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], None, bias[i:i + 1], 0.2, True, spec, "")
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=0)
