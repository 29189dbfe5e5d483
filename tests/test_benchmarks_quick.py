"""The benchmark scripts run end to end in --quick mode (timings are never asserted)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, out, timeout):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    with open(out) as f:
        return json.load(f), res.stdout


@pytest.mark.slow
def test_cpu_attention_quick(tmp_path):
    data, stdout = _run("cpu_attention.py", tmp_path / "cpu.json", 180)
    assert "| case |" in stdout
    rows = data["rows"]
    assert {r["case"] for r in rows} >= {"sw1d-1024", "na2d-24x24", "dense-512"}
    for r in rows:
        assert 0 < r["density"] <= 1
        for key in ("cpu_fwd", "cpu_fwd_bwd", "sdpa_fwd", "sdpa_fwd_bwd"):
            assert r[key]["median_ms"] > 0
    assert rows[0]["flex_max_abs_diff_vs_cpu"] < 1e-4   # FlexAttention computes the same attention


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_e2e_dit_quick(tmp_path):
    data, stdout = _run("e2e_dit.py", tmp_path / "dit.json", 240)
    row = data["rows"][0]
    v = row["variants"]
    assert set(v) == {"inductor", "locattn-dense", "locattn-na", "locattn-na-blocked"}
    assert v["locattn-na"]["counters"]["dispatch"].get("cpu")                 # the fast CPU path ran
    assert v["locattn-dense"]["error_vs_inductor"]["max_abs"] < 1e-3
    assert v["locattn-na"]["error_vs_blocked"]["max_abs"] < 1e-4


@pytest.mark.slow
def test_sequence_parallel_quick(tmp_path):
    data, stdout = _run("sequence_parallel.py", tmp_path / "sp.json", 240)
    assert "| case | axis | ranks |" in stdout and "| case | ranks | halo ms |" in stdout
    rows = data["rows"][0]
    assert {r["case"] for r in rows["bytes"]} == {"na3d-6x8x10", "tiled3d-6x8x10"}
    for r in rows["bytes"]:
        assert 0 <= r["halo_bytes"] <= r["all_gather_bytes"]
    assert all(r["halo_ms"] > 0 and r["all_gather_ms"] > 0 for r in rows["time"])
    assert {r["ranks"] for r in rows["e2e"]} == {1, 2} and all(r.get("overlap_ms", 1) > 0 for r in rows["e2e"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs diffusers and transformers")
def test_compile_time_quick(tmp_path):
    data, stdout = _run("compile_time.py", tmp_path / "ct.json", 600)
    assert "| model | tokens | inductor first call (s)" in stdout
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"DiT", "SmolLM2"}
    for r in rows.values():
        assert set(r["median_first_s"]) == {"inductor", "locattn-dense", "locattn-local"}
        assert r["runs"]["locattn-dense"][0]["rewrites"] > 0 and r["runs"]["locattn-local"][0]["rewrites"] > 0
        assert r["runs"]["inductor"][0]["rewrites"] == 0
    site = data["meta"]["site_3d"]
    assert 0 < site["density"] < 1 and sum(site["blocks_full_partial"]) > 0


@pytest.mark.slow
def test_linear_attention_quick(tmp_path):
    data, stdout = _run("linear_attention.py", tmp_path / "lin.json", 180)
    assert "| variant |" in stdout
    assert {r["variant"] for r in data["rows"]} == {"sdpa", "linear-elu", "linear-favor", "sliding_window", "hybrid",
                                                   "hybrid-elu"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in data["rows"])
    assert "hybrid overhead fwd+bwd" in data["meta"]["ratios"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_graft_smollm2_quick(tmp_path):
    data, stdout = _run("graft_smollm2.py", tmp_path / "graft.json", 300)
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "sliding_window", "hybrid", "sliding_window + graft 3", "hybrid + graft 3"}
    assert all(math.isfinite(r["perplexity"]) for r in rows.values())
    assert rows["hybrid"]["dispatch"].get("linear_chunked")                 # the hybrid path ran
    assert len(rows["hybrid + graft 3"]["graft_curve"]) == 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_lm_fidelity_quick(tmp_path):
    data, stdout = _run("lm_fidelity.py", tmp_path / "lm.json", 300)
    rows = {r["policy"]: r for r in data["rows"]}
    assert rows["dense"]["causal_kept"] == 1.0
    w = rows["sliding_window 64 + 4 sinks"]
    assert 0 < w["causal_kept"] < 1
    assert abs(w["independent_ppl"] / w["ppl"] - 1) < 1e-4     # locattn == an explicit masked attention


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_calibration_quick(tmp_path):
    data, stdout = _run("calibration.py", tmp_path / "cal.json", 600)
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"smollm2", "dit"}
    for r in rows.values():
        assert r["calibration_holdout_error"] is None or r["calibration_holdout_error"] <= r["budget"]
        assert os.path.exists(r["policy"])
