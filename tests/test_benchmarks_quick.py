"""The benchmark scripts run end to end in --quick mode (timings are never asserted)."""

import importlib.util
import json
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
