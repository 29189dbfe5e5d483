"""End-to-end CPU benchmark: a diffusers ``DiTTransformer2DModel`` (random weights) under torch.compile.

Variants, per image size (tokens = (sample_size / patch_size)^2):

* ``inductor``      ``torch.compile(model)`` (default backend, dense SDPA),
* ``locattn-dense`` ``backend="locattn"`` with the all-dense policy (sites run ``locattn::attention`` dense),
* ``locattn-na``    ``backend="locattn"`` with a 2-D neighborhood policy on every self-attention
  (grid = [H/p, W/p], kernel k x k chosen for ~10% density),
* ``locattn-na-blocked``  the same policy on the ``blocked`` implementation: one run, only to check that the
  fast CPU path computes the same model (its time is not a target).

Reported: per-forward time (median of ``--reps`` after the compiling call), compile time (first call minus
one forward), and max-abs / relative error of the output against ``inductor`` (for the neighborhood policy
this is the approximation, not a bug) and, for ``locattn-na``, against ``locattn-na-blocked``.

Usage::

    python benchmarks/e2e_dit.py            # 4096 and 16384 tokens, writes benchmarks/out/e2e_dit.json
    python benchmarks/e2e_dit.py --quick    # tiny model, < 60 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

import locattn
from locattn.patterns import Layout, Neighborhood, count_allowed



def build_model(sample_size: int, layers: int, heads: int, head_dim: int, patch: int = 2):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  num_layers=layers, sample_size=sample_size, patch_size=patch,
                                  norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
    return model.eval()


def na_policy(grid: tuple[int, int], kernel: int) -> dict:
    return {"version": 1, "default": {"pattern": "dense"},
            "rule": [{"match": "transformer_blocks.*.attn1", "pattern": "neighborhood",
                      "kernel": [kernel, kernel], "grid": list(grid)}]}


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.double() - ref.double())
    return {"max_abs": float(d.abs().max()), "rel": float(d.norm() / ref.double().norm())}


def run_size(sample: int, layers: int, heads: int, head_dim: int, reps: int, check_blocked: bool) -> dict:
    patch = 2
    side = sample // patch
    tokens = side * side
    kernel = max(1, round((0.1 * tokens) ** 0.5))
    grid = (side, side)
    density = count_allowed(Neighborhood(kernel=(kernel, kernel)), Layout(grid=grid), tokens, tokens) / tokens ** 2
    model = build_model(sample, layers, heads, head_dim, patch)
    x = torch.randn(1, 4, sample, sample)
    t = torch.tensor([500])
    y = torch.tensor([7])
    row = {"sample_size": sample, "tokens": tokens, "grid": list(grid), "kernel": [kernel, kernel],
           "density": density, "layers": layers, "heads": heads, "head_dim": head_dim, "variants": {}}
    variants = [
        ("inductor", dict()),
        ("locattn-dense", dict(backend="locattn", options={"policy": {"version": 1, "default": {"pattern": "dense"}}})),
        ("locattn-na", dict(backend="locattn", options={"policy": na_policy(grid, kernel)})),
    ]
    if check_blocked:
        variants.append(("locattn-na-blocked",
                         dict(backend="locattn", options={"policy": na_policy(grid, kernel), "backend": "blocked"})))
    outs = {}
    for name, kw in variants:
        torch._dynamo.reset()
        locattn.reset_counters()
        cm = torch.compile(model, **kw)
        with torch.no_grad():
            t0 = time.perf_counter()
            outs[name] = cm(x, timestep=t, class_labels=y).sample
            first = time.perf_counter() - t0
            ts = []
            for _ in range(reps if name != "locattn-na-blocked" else 1):
                t0 = time.perf_counter()
                cm(x, timestep=t, class_labels=y)
                ts.append(time.perf_counter() - t0)
        v = {"forward_ms": statistics.median(ts) * 1e3, "forward_min_ms": min(ts) * 1e3,
             "runs_ms": [s * 1e3 for s in ts], "compile_s": first - statistics.median(ts),
             "counters": {k: dict(c) for k, c in locattn.counters().items()}}
        if name != "inductor":
            v["error_vs_inductor"] = errors(outs[name], outs["inductor"])
        row["variants"][name] = v
        print(f"  {tokens:>6} tokens {name:>18}: {v['forward_ms']:9.1f} ms/forward, compile {v['compile_s']:.1f} s",
              flush=True)
    if check_blocked:
        row["variants"]["locattn-na"]["error_vs_blocked"] = errors(outs["locattn-na"], outs["locattn-na-blocked"])
    base = row["variants"]["inductor"]["forward_ms"]
    row["speedup_na_vs_inductor"] = base / row["variants"]["locattn-na"]["forward_ms"]
    row["speedup_dense_vs_inductor"] = base / row["variants"]["locattn-dense"]["forward_ms"]
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| tokens | variant | ms/forward | compile s | max abs err vs inductor | rel err vs inductor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for name, v in r["variants"].items():
            e = v.get("error_vs_inductor", {})
            print(f"| {r['tokens']} | {name} | {v['forward_ms']:.1f} | {v['compile_s']:.1f} | "
                  f"{e.get('max_abs', 0):.3g} | {e.get('rel', 0):.3g} |")
    for r in rows:
        eb = r["variants"]["locattn-na"].get("error_vs_blocked")
        print(f"{r['tokens']} tokens (grid {r['grid']}, kernel {r['kernel']}, density {r['density']:.3f}): "
              f"neighborhood {r['speedup_na_vs_inductor']:.2f}x, dense policy {r['speedup_dense_vs_inductor']:.2f}x "
              f"vs inductor" + (f"; cpu vs blocked max abs {eb['max_abs']:.2g}" if eb else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model (< 60 s)")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards after the compiling one (default 5)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="sample sizes (latent side)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--no-blocked-check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed (pip install -e .[models])")
        return 2
    sizes = args.sizes or ([32] if args.quick else [128, 256])
    layers = args.layers or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 5)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:], "reps": reps,
            "loadavg_start": os.getloadavg()}
    print(f"torch {meta['torch']}, {meta['threads']} threads, load {meta['loadavg_start']}")
    rows = [run_size(s, layers, args.heads, 64, reps, not args.no_blocked_check) for s in sizes]
    meta["loadavg_end"] = os.getloadavg()
    print_table(rows)
    write_results("e2e_dit", args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
