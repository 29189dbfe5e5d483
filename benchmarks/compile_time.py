"""Compile time: ``torch.compile`` default vs ``backend="locattn"`` on small real models, side by side.

Per model, three variants, each the *compile + first call* of a fresh model copy:

* ``inductor``        ``torch.compile(model)`` (the default backend),
* ``locattn-dense``   ``backend="locattn"`` with the all-dense policy (every site rewritten, exact),
* ``locattn-local``   ``backend="locattn"`` with a local policy (2-D neighborhood / sliding window).

Models (random weights, small configs; ``--quick`` shrinks them further): diffusers DiT, FLUX and a
UNet2DConditionModel, and a SmolLM2-135M-shaped Llama (4 layers) at a long sequence.

How it is measured: every (model, variant) runs in its own child process with an empty Inductor cache
directory (``TORCHINDUCTOR_CACHE_DIR``) and the FX-graph / autograd caches off, so each compile is as cold as a
new user's and none reuses kernels another variant compiled (in one process, the second compile of the same
model reuses Inductor's compiled C++ kernels and looks 3-5x cheaper, whichever backend it uses). Imports, model
construction and one eager forward happen before the clock starts. Variants run interleaved, ``--reps`` rounds
in an order that rotates from round to round; the table shows the median. Also reported: the second call (steady state; ``compile ≈ first - second``) and the
time locattn's own graph pass took (``rewrite``: find sites, decide, rewrite; the rest is Dynamo + Inductor).

Usage::

    python benchmarks/compile_time.py                 # all models, 3 rounds, writes benchmarks/out/compile_time.json
    python benchmarks/compile_time.py --quick         # tiny configs, 1 round, variants share one process (tests)
    python benchmarks/compile_time.py --profile DiT locattn-local   # cProfile of one child, locattn's functions

Timings on a shared machine are noisy: the script records the load average next to them; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("inductor", "locattn-dense", "locattn-local")
MODELS = ("DiT", "FLUX", "UNet", "SmolLM2")


# ------------------------------------------------------------------------------------------------ models

def build(name: str, quick: bool):
    """``(model, kwargs, local_policy, tokens)`` for one model."""
    import torch

    torch.manual_seed(0)
    if name == "DiT":
        from diffusers import DiTTransformer2DModel

        side = 8 if quick else 32                        # tokens = side^2
        m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32 if not quick else 8, in_channels=4,
                                  num_layers=1 if quick else 4, sample_size=2 * side, patch_size=2,
                                  norm_num_groups=8 if quick else 32)
        x = dict(hidden_states=torch.randn(1, 4, 2 * side, 2 * side), timestep=torch.tensor([3]),
                 class_labels=torch.tensor([1]))
        policy = {"version": 1, "default": {"pattern": "dense"},
                  "rule": [{"match": "transformer_blocks.*.attn1", "pattern": "neighborhood", "kernel": 7 if not quick
                            else 3, "grid": "auto"}]}
        return m.eval(), x, policy, side * side
    if name == "FLUX":
        from diffusers import FluxTransformer2DModel

        side, n_txt = (8, 7) if quick else (32, 16)     # image tokens = side^2, text first
        m = FluxTransformer2DModel(in_channels=16, num_layers=1 if quick else 2, num_single_layers=1 if quick else 2,
                                   attention_head_dim=16 if quick else 32, num_attention_heads=2 if quick else 4,
                                   joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6) if quick else (8, 12, 12))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1)
        x = dict(hidden_states=torch.randn(1, side * side, 16), encoder_hidden_states=torch.randn(1, n_txt, 32),
                 pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.3]), img_ids=ids.reshape(-1, 3),
                 txt_ids=torch.zeros(n_txt, 3))
        policy = {"version": 1, "default": {"pattern": "dense"},
                  "rule": [{"match": "*", "pattern": "neighborhood", "kernel": 3 if quick else 7,
                            "grid": [side, side], "globals": {"prefix": n_txt}}]}
        return m.eval(), x, policy, side * side + n_txt
    if name == "UNet":
        from diffusers import UNet2DConditionModel

        side = 16 if quick else 32                       # latent side; the first attention level has side^2 tokens
        m = UNet2DConditionModel(sample_size=side, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
        x = dict(sample=torch.randn(1, 4, side, side), timestep=torch.tensor([3]),
                 encoder_hidden_states=torch.randn(1, 7, 32))
        policy = {"version": 1, "default": {"pattern": "dense"},
                  "rule": [{"match": "*.attn1", "pattern": "sliding_window", "window": 64 if not quick else 16}]}
        return m.eval(), x, policy, side * side
    if name == "SmolLM2":
        from transformers import LlamaConfig, LlamaForCausalLM

        seq = 128 if quick else 2048
        # SmolLM2-135M's shapes (hidden 576, 9 heads / 3 kv heads, MLP 1536), fewer layers and a smaller vocabulary
        cfg = LlamaConfig(hidden_size=576 if not quick else 64, num_attention_heads=9 if not quick else 4,
                          num_key_value_heads=3 if not quick else 2, intermediate_size=1536 if not quick else 128,
                          num_hidden_layers=4 if not quick else 1, vocab_size=4096 if not quick else 128,
                          max_position_embeddings=8192, tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg)
        x = dict(input_ids=torch.randint(0, cfg.vocab_size, (1, seq)), use_cache=False)
        policy = {"version": 1, "default": {"pattern": "dense"},
                  "rule": [{"match": "*", "pattern": "sliding_window", "window": 256 if not quick else 16}]}
        return m.eval(), x, policy, seq
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ one child

def child(name: str, variants: list[str], quick: bool, profile: bool) -> list[dict]:
    import importlib

    import torch

    import locattn

    lb = importlib.import_module("locattn.backend")    # the module (``locattn.backend`` is also a function)
    model, x, local_policy, tokens = build(name, quick)
    with torch.no_grad():
        model(**x)                                        # eager warm-up: lazy inits, allocator
    spent = [0.0]
    rewrite = lb.rewrite_graph

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return rewrite(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    lb.rewrite_graph = timed
    out = []
    for variant in variants:
        torch._dynamo.reset()
        spent[0] = 0.0
        if variant == "inductor":
            compiled = torch.compile(model)
        else:
            policy = {"version": 1, "default": {"pattern": "dense"}} if variant == "locattn-dense" else local_policy
            compiled = torch.compile(model, backend="locattn", options={"policy": policy})
        locattn.reset_counters()
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**x)
        first = time.perf_counter() - t0
        if prof is not None:
            import pstats

            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats("locattn", 40)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**x)
        second = time.perf_counter() - t0
        c = locattn.counters()
        out.append({"model": name, "variant": variant, "tokens": tokens, "first_s": first, "second_s": second,
                    "rewrite_s": spent[0], "rewrites": sum(c.get("rewrite", {}).values()),
                    "fallbacks": dict(c.get("fallback", {}))})
    return out


def run_child(name: str, variants: list[str], quick: bool, profile: bool = False, timeout: int = 1800) -> list[dict]:
    """Run ``variants`` of one model in a child process with an empty Inductor cache (one variant per child for
    cold compiles; several share one child, and its caches, in ``--quick`` mode)."""
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="locattn_ct_") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, ",".join(variants)] + \
            (["--quick"] if quick else []) + (["--profile-child"] if profile else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if profile:
        sys.stderr.write(res.stderr[-20000:])
    if res.returncode != 0:
        raise RuntimeError(f"{name}/{variants} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def site_3d(quick: bool) -> dict:
    """One 3-D neighborhood site (a video model's, 30x48x80 latent tokens; ``--quick`` 6x8x10): the rewrite alone
    (what every compile pays) and the explain statistics read afterwards (what only ``explain`` pays)."""
    from locattn.passes.rewrite import rewrite_graph
    from locattn.policy import Policy
    from locattn.testing import fake_sdpa_graph

    grid = (6, 8, 10) if quick else (30, 48, 80)
    gm = fake_sdpa_graph((1, 24, grid[0] * grid[1] * grid[2], 64), path="blocks.0.attn1")
    pol = Policy.from_dict({"default": {"pattern": "neighborhood", "kernel": [3, 7, 9], "grid": list(grid)}})
    t0 = time.perf_counter()
    (d,) = rewrite_graph(gm, pol)
    t1 = time.perf_counter()
    density = d.density
    t2 = time.perf_counter()
    blocks = (d.blocks_full, d.blocks_partial)
    t3 = time.perf_counter()
    return {"grid": list(grid), "rewrite_s": t1 - t0, "density_s": t2 - t1, "blocks_s": t3 - t2, "density": density,
            "blocks_full_partial": list(blocks)}


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configs, one round")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {MODELS}")
    ap.add_argument("--reps", type=int, default=None, help="rounds (default 3, --quick 1)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/compile_time[_quick].json)")
    ap.add_argument("--profile", nargs=2, metavar=("MODEL", "VARIANT"), help="cProfile one child (locattn rows)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1].split(","), a.quick, a.profile_child)))
        return
    if a.profile:
        print(json.dumps(run_child(a.profile[0], [a.profile[1]], a.quick, profile=True)))
        return
    from _results import write_results

    models = a.models or (["DiT", "SmolLM2"] if a.quick else list(MODELS))
    reps = a.reps or (1 if a.quick else 3)
    runs: dict[tuple[str, str], list[dict]] = {}
    loads = [_load()]
    for rep in range(reps):
        for name in models:
            # --quick: one child per model (later variants reuse its warm caches: checks the script, not the times);
            # otherwise the variants' order rotates from round to round (no variant always runs first)
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
            batches = [list(VARIANTS)] if a.quick else [[v] for v in order]
            for r in (r for batch in batches for r in run_child(name, batch, a.quick)):
                r["load"] = _load()
                runs.setdefault((name, r["variant"]), []).append(r)
                print(f"  {name:8s} {r['variant']:14s} first call {r['first_s']:7.2f} s  (rewrite {r['rewrite_s']:.3f} s, "
                      f"load {r['load']})", flush=True)
    loads.append(_load())
    rows = []
    print("\n| model | tokens | inductor first call (s) | locattn-dense (s) | ratio | locattn-local (s) | ratio | "
          "locattn rewrite (s) dense / local |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        med = {v: statistics.median(r["first_s"] for r in runs[(name, v)]) for v in VARIANTS}
        rw = {v: statistics.median(r["rewrite_s"] for r in runs[(name, v)]) for v in VARIANTS}
        row = {"model": name, "tokens": runs[(name, "inductor")][0]["tokens"], "median_first_s": med,
               "median_rewrite_s": rw, "ratio_dense": med["locattn-dense"] / med["inductor"],
               "ratio_local": med["locattn-local"] / med["inductor"],
               "runs": {v: runs[(name, v)] for v in VARIANTS}}
        rows.append(row)
        print(f"| {name} | {row['tokens']} | {med['inductor']:.2f} | {med['locattn-dense']:.2f} | "
              f"{row['ratio_dense']:.2f}x | {med['locattn-local']:.2f} | {row['ratio_local']:.2f}x | "
              f"{rw['locattn-dense']:.3f} / {rw['locattn-local']:.3f} |")
    site = site_3d(a.quick)
    print(f"\n3-D neighborhood site {'x'.join(map(str, site['grid']))}: rewrite {site['rewrite_s']:.3f} s (every "
          f"compile); explain statistics: density {site['density_s']:.3f} s, blocks {site['blocks_s']:.3f} s")
    import torch

    meta = {"site_3d": site, "torch": torch.__version__, "reps": reps, "quick": a.quick, "load_before_after": loads,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_results("compile_time", a.quick, meta, rows, a.out)


if __name__ == "__main__":
    main()
