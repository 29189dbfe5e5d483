"""examples/diffusers_pipeline.py --quick: a real PixArtSigmaPipeline (small configs, random weights) whose
transformer is compiled with backend="locattn" and a schedule (dense first 20% of steps) runs end to end, switches
phase without recompiling, and stays close to the torch.compile default pipeline. Timings are never asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_pipeline_example_quick(tmp_path):
    out = tmp_path / "pipe.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "diffusers_pipeline.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "locattn explain" in res.stdout and "t in [800, 1000]: dense" in res.stdout
    data = json.loads(out.read_text())
    ours, default = data["variants"]["locattn"], data["variants"]["inductor"]
    assert ours["compiles_after_warmup"] == 0 and default["compiles_after_warmup"] == 0
    assert set(ours["counters"]["phase"]) == {"0", "1"}          # both phases ran in the compiled model
    assert len(ours["step_s"]) == len(default["step_s"]) == 4
    attn1 = [r for r in data["explain"] if r["path"].endswith("attn1")]
    assert attn1 and all(len(r["phases"]) == 3 for r in attn1)  # below, inside and above [800, 1000]
    diff = data["image_diff"]
    assert 0 < diff["latents_rel_l2"] < 0.05                     # the local phase changed the result, a little
