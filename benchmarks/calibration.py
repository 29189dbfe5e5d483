"""What calibration buys (issue 15): ``locattn.calibrate`` on one text, evaluated on another.

SmolLM2-135M (:mod:`smollm2`): calibrate on 4 windows of 2048 tokens of GPL-2 + Apache-2.0 (the last held out
by the calibration itself), metric = perplexity change, at budgets 1 %, 2 %, 5 %; evaluate the written policy
on the first 2048 tokens of GPL-3 + Apache-2.0 + GPL-2 (issue 14's fidelity text, which the calibration never
saw) through ``torch.compile(backend="locattn")``. Per budget: fraction of causal scores kept (exact, per site
and head), held-out perplexity change, calibration wall and CPU time, and the CPU forward time against
``torch.compile`` default (median of ``--reps``).

The embedded DiT example (``examples/dit_model.py``, random weights: the mechanics, not fidelity): calibrate on
4 random latents (default metric: relative L2 of the output), evaluate on a fifth; kept fraction = the policy's
density (fraction of the dense scores), speed as above.

Usage::

    python benchmarks/calibration.py                 # both, writes benchmarks/out/calibration.json and the policies
    python benchmarks/calibration.py --only lm --budgets 0.02
    python benchmarks/calibration.py --quick         # tiny random Llama + tiny DiT (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

import smollm2  # noqa: E402
from _results import OUT_DIR, write_results  # noqa: E402

import locattn  # noqa: E402
from locattn.calibration import calibrate_with_report, perplexity_change  # noqa: E402

CAL_TEXTS = ("GPL-2", "Apache-2.0")


def _timed_calibration(model, samples, budget, **kw):
    w0, c0 = time.perf_counter(), time.process_time()
    cal = calibrate_with_report(model, samples, budget=budget, **kw)
    return cal, time.perf_counter() - w0, time.process_time() - c0


def _save(policy, name: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(policy.to_toml())
    return path


def lm_rows(args, out_dir) -> tuple[dict, list]:
    lm = smollm2.load(args.quick)
    n = args.tokens or (256 if args.quick else 2048)
    samples = [smollm2.lm_sample(x) for x in smollm2.chunks(lm, CAL_TEXTS, n, 4)]
    eval_ids = smollm2.tokens(lm, n=n)
    dense = smollm2.perplexity(lm, eval_ids, None)
    t_dense = smollm2.forward_time(dense.compiled, eval_ids, args.reps)   # locattn, all-dense policy
    torch._dynamo.reset()
    default = torch.compile(lm.model)
    t_default = smollm2.forward_time(default, eval_ids, args.reps)
    rows = []
    for budget in args.budgets:
        torch._dynamo.reset()
        cal, wall, cpu = _timed_calibration(lm.model, samples, budget, metric=perplexity_change,
                                            progress=not args.quick, cost=args.cost, proxy=args.proxy)
        tag = f"{budget:g}_{args.cost}_{args.proxy}{'_quick' if args.quick else ''}"
        path = _save(cal.policy, f"calibrated_smollm2_{tag}.toml", out_dir)
        locattn.reset_counters()       # dynamic rules' kept fraction is measured during this run
        r = smollm2.perplexity(lm, eval_ids, cal.policy)
        t = smollm2.forward_time(r.compiled, eval_ids, args.reps)
        rows.append({"model": "smollm2", "budget": budget, "cost": args.cost, "proxy": cal.report.proxy, "policy": path, "rules": len(cal.policy.rules),
                     "causal_kept": smollm2.causal_kept(r.decisions, n),
                     "predicted_kept": cal.report.scores_kept, "calibration_fit_error": cal.report.fit_error,
                     "calibration_holdout_error": cal.report.holdout_error, "eval_ppl": r.ppl,
                     "dense_ppl": dense.ppl, "eval_change": r.ppl / dense.ppl - 1, "calibration_wall_s": wall,
                     "calibration_cpu_s": cpu, "phases": cal.report.phases, "forward_s": t,
                     "default_forward_s": t_default, "speedup_vs_default": t_default / t,
                     "dense_locattn_forward_s": t_dense, "speedup_vs_dense_locattn": t_dense / t,
                     "note": cal.report.note,
                     "backed_off": len(cal.report.backed_off), "evaluations": cal.report.evaluations,
                     "load": smollm2.load_avg()})
        print(_fmt(rows[-1]), flush=True)
    return {"model": lm.name, "tokens": n, "calibration_texts": "+".join(CAL_TEXTS),
            "eval_text": "+".join(smollm2.FIDELITY_TEXTS), "dense_ppl": dense.ppl}, rows


def dit_rows(args, out_dir) -> tuple[dict, list]:
    from dit_model import TinyDiT

    size, layers = (32, 2) if args.quick else (128, 4)
    torch.manual_seed(0)
    model = TinyDiT(layers=layers).eval()
    samples = [(torch.randn(1, 4, size, size),) for _ in range(4)]
    x = torch.randn(1, 4, size, size)
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    default = torch.compile(model)
    t_default = _time(default, x, args.reps)
    rows = []
    for budget in args.budgets:
        torch._dynamo.reset()
        cal, wall, cpu = _timed_calibration(model, samples, budget, progress=not args.quick, cost=args.cost)
        path = _save(cal.policy, f"calibrated_dit_{budget:g}_{args.cost}{'_quick' if args.quick else ''}.toml",
                     out_dir)
        torch._dynamo.reset()
        b = locattn.backend(cal.policy)
        compiled = torch.compile(model, backend=b)
        t = _time(compiled, x, args.reps)
        with torch.no_grad():
            out = compiled(x)
        dens = [d.density if d.rewritten and d.density is not None else 1.0 for d in b.decisions]
        rows.append({"model": "dit", "budget": budget, "cost": args.cost, "policy": path, "rules": len(cal.policy.rules),
                     "kept": sum(dens) / len(dens), "predicted_kept": cal.report.scores_kept,
                     "calibration_fit_error": cal.report.fit_error,
                     "calibration_holdout_error": cal.report.holdout_error,
                     "eval_error": float((out - ref).norm() / ref.norm()), "calibration_wall_s": wall,
                     "calibration_cpu_s": cpu, "phases": cal.report.phases, "forward_s": t,
                     "default_forward_s": t_default, "speedup_vs_default": t_default / t, "note": cal.report.note,
                     "backed_off": len(cal.report.backed_off), "load": smollm2.load_avg()})
        print(_fmt(rows[-1]), flush=True)
    return {"model": f"TinyDiT(layers={layers}) random weights", "tokens": (size // 2) ** 2}, rows


def _time(fn, x, reps):
    import statistics

    with torch.no_grad():
        fn(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _fmt(r: dict) -> str:
    kept = r.get("causal_kept", r.get("kept"))
    err = r.get("eval_change", r.get("eval_error"))
    return (f"| {r['model']} | {r['budget']:g} | {kept:.1%} | {err:+.2%} | {r['calibration_wall_s']:.0f} s "
            f"({r['calibration_cpu_s']:.0f} s CPU) | {r['speedup_vs_default']:.3g}x | {r['rules']} | {r['load']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["lm", "dit"], default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--cost", choices=["time", "blocks", "scores"], default="time")
    ap.add_argument("--proxy", choices=["output", "gradient"], default="output",
                    help="the LM's per-head error proxy (the DiT's metric has no gradient at the reference)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.budgets = args.budgets or ([0.05] if args.quick else [0.01, 0.02, 0.05])
    args.reps = args.reps or (1 if args.quick else 3)
    out_dir = os.path.dirname(args.out) if args.out else OUT_DIR
    print("| model | budget | scores kept | held-out change | calibration time | speedup vs torch.compile | rules "
          "| load |")
    print("|---|---|---|---|---|---|---|---|")
    meta, rows = {"threads": torch.get_num_threads(), "load_start": smollm2.load_avg()}, []
    if args.only in (None, "lm"):
        m, r = lm_rows(args, out_dir)
        meta["lm"], rows = m, rows + r
    if args.only in (None, "dit"):
        m, r = dit_rows(args, out_dir)
        meta["dit"], rows = m, rows + r
    name = "calibration" + ("" if args.cost == "time" else f"_{args.cost}") + \
        ("" if args.proxy == "output" else f"_{args.proxy}")
    write_results(name, args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
