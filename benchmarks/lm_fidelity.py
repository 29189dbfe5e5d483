"""SmolLM2-135M perplexity under locattn policies (issue 14's fidelity benchmark; rows for other patterns are
added by the scripts that build them on :mod:`smollm2`).

Rows: dense, uniform ``sliding_window`` 512 and 256 (+4 sinks, causal) on every layer; per row the perplexity of
the first 2048 tokens of GPL-3 + Apache-2.0 + GPL-2 through ``torch.compile(backend="locattn")``, its change
vs dense, and the fraction of causal scores kept. Independent check: the window-512 row recomputed by the eager
model with an explicit masked attention (no locattn code); the two perplexities must agree.

Usage::

    python benchmarks/lm_fidelity.py             # SmolLM2 (needs the [bench] extra), writes benchmarks/out/lm_fidelity.json
    python benchmarks/lm_fidelity.py --quick     # tiny random Llama, 256 tokens
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import smollm2  # noqa: E402
from _results import write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs eagerly (faster compile)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n = args.tokens or (256 if args.quick else 2048)
    windows = (64, 32) if args.quick else (512, 256)
    lm = smollm2.load(args.quick)
    ids = smollm2.tokens(lm, n=n)
    inductor = not args.no_inductor
    rows = []
    dense = smollm2.perplexity(lm, ids, None, inductor)
    rows.append({"policy": "dense", "ppl": dense.ppl, "change": 0.0, "causal_kept": 1.0})
    for w in windows:
        r = smollm2.perplexity(lm, ids, smollm2.window_policy(w, 4), inductor)
        row = {"policy": f"sliding_window {w} + 4 sinks", "ppl": r.ppl, "change": r.ppl / dense.ppl - 1,
               "causal_kept": smollm2.causal_kept(r.decisions, n)}
        if w == windows[0]:
            row["independent_ppl"] = smollm2.reference_windowed_ppl(lm, ids, w, 4)
        rows.append(row)
    print(f"{lm.name}, {n} tokens of {'+'.join(smollm2.FIDELITY_TEXTS)} (load {smollm2.load_avg()})")
    print("| policy | perplexity | change | causal scores kept | independent check |")
    print("|---|---|---|---|---|")
    for r in rows:
        ind = f"{r['independent_ppl']:.4f}" if "independent_ppl" in r else "-"
        print(f"| {r['policy']} | {r['ppl']:.4f} | {r['change']:+.2%} | {r['causal_kept']:.1%} | {ind} |")
    write_results("lm_fidelity", args.quick, {"model": lm.name, "tokens": n, "inductor": inductor,
                                              "load": smollm2.load_avg()}, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
