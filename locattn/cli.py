"""Command line: ``python -m locattn explain FILE.py:FUNC [--policy P] [--json]``,
``python -m locattn show --pattern NAME --grid 32,32 [--param k=v ...] [--query c1,c2] -o out.png`` and
``python -m locattn graft FILE.py:FUNC --policy P --steps N [--lr 1e-4] [--params attention|all] [-o state.pt]``
(FUNC returns ``(model, samples)``; see :func:`locattn.graft`) and
``python -m locattn calibrate FILE.py:FUNC --budget 0.02 -o policy.toml`` (FUNC returns ``(model, samples)`` or
``(model, samples, metric)``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def _load_func(spec: str):
    path, _, func = spec.rpartition(":")
    if not path or not func:
        raise SystemExit(f"expected FILE.py:FUNC, got {spec!r}")
    mod_spec = importlib.util.spec_from_file_location("_locattn_target", path)
    if mod_spec is None or mod_spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, func):
        raise SystemExit(f"{path} has no function {func!r}")
    return getattr(mod, func)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        if "," in v:
            return [_parse_value(x) for x in v.split(",")]
        return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="locattn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("explain", help="report every attention site of a model and the policy's decision")
    ex.add_argument("target", help="FILE.py:FUNC where FUNC() returns (model, example_args)")
    ex.add_argument("--policy", default=None, help="policy TOML (default: $LOCATTN_POLICY, else all-dense)")
    ex.add_argument("--json", action="store_true", help="print JSON instead of the table")
    sh = sub.add_parser("show", help="draw what a query attends on its grid, and the block plan")
    sh.add_argument("--pattern", required=True)
    sh.add_argument("--grid", required=True, help="e.g. 32,32")
    sh.add_argument("--param", action="append", default=[], help="pattern parameter, e.g. kernel=7,7")
    sh.add_argument("--query", default=None, help="query coordinate, e.g. 3,5 (default: centre)")
    sh.add_argument("--block", type=int, default=64)
    sh.add_argument("-o", "--output", default="pattern.png")
    gr = sub.add_parser("graft", help="fine-tune a model so its rewritten attention sites match the dense model")
    gr.add_argument("target", help="FILE.py:FUNC where FUNC() returns (model, samples)")
    gr.add_argument("--policy", required=True, help="policy TOML")
    gr.add_argument("--steps", type=int, required=True)
    gr.add_argument("--lr", type=float, default=1e-4)
    gr.add_argument("--params", choices=["attention", "all"], default="attention")
    gr.add_argument("--inputs", choices=["teacher", "student"], default="teacher",
                    help="each student site module sees the teacher's input (layer-local) or its own (end to end)")
    gr.add_argument("--output-weight", type=float, default=0.0, help="weight of the final-output MSE (--inputs "
                    "student)")
    gr.add_argument("-o", "--output", default="grafted.pt", help="where the trained state dict goes")
    gr.add_argument("--log", default=None, help="write the per-step losses (JSON) here")
    gr.add_argument("--quiet", action="store_true")
    ca = sub.add_parser("calibrate", help="choose a pattern per site and head within an end-to-end error budget")
    ca.add_argument("target", help="FILE.py:FUNC where FUNC() returns (model, samples) or (model, samples, metric)")
    ca.add_argument("--budget", type=float, default=0.02, help="largest allowed metric (default 0.02)")
    ca.add_argument("-o", "--output", default="policy.toml", help="policy TOML to write")
    ca.add_argument("--cost", choices=["time", "blocks", "scores"], default="time",
                    help="candidate cost: measured time (cached per machine), the plan's block count, or the "
                         "attention scores kept (FLOPs)")
    ca.add_argument("--proxy", choices=["output", "gradient"], default="output",
                    help="per-head error the solver adds up: the site's output error, or weighted by the metric's "
                         "gradient (needs a metric like perplexity_change)")
    ca.add_argument("--holdout", type=int, default=None, help="samples held out for validation (default n // 4)")
    ca.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "explain":
        import locattn

        made = _load_func(args.target)()
        model, ex_args = made[0], made[1]
        ex_kwargs = made[2] if len(made) > 2 else {}
        report = locattn.explain(model, *ex_args, policy=args.policy, **ex_kwargs)
        print(report.to_json(indent=2) if args.json else report)
        return 0
    if args.cmd == "calibrate":
        from .calibration import CalibrationError, calibrate_with_report

        made = _load_func(args.target)()
        if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
            raise SystemExit(f"{args.target} must return (model, samples) or (model, samples, metric)")
        metric = made[2] if len(made) == 3 else None
        try:
            cal = calibrate_with_report(made[0], made[1], budget=args.budget, metric=metric, cost=args.cost,
                                        proxy=args.proxy, holdout=args.holdout, progress=not args.no_progress)
        except CalibrationError as e:
            raise SystemExit(str(e)) from None
        with open(args.output, "w") as f:
            f.write(cal.policy.to_toml())
        print(cal.report.summary())
        print(f"wrote {args.output} ({len(cal.policy.rules)} rule(s))")
        return 0
    if args.cmd == "show":
        from .show import show

        params = {}
        for p in args.param:
            k, _, v = p.partition("=")
            params[k] = _parse_value(v)
        grid = tuple(int(x) for x in args.grid.split(","))
        query = tuple(int(x) for x in args.query.split(",")) if args.query else None
        path = show(args.pattern, grid, params, query=query, block=args.block, output=args.output)
        print(path)
        return 0
    if args.cmd == "graft":
        from .grafting import graft, save_history

        made = _load_func(args.target)()
        model, samples = made[0], made[1]
        history: list = []
        try:
            graft(model, args.policy, samples, steps=args.steps, lr=args.lr, params=args.params,
                  progress=not args.quiet, inputs=args.inputs, output_weight=args.output_weight, save=args.output,
                  history=history)
        except ValueError as e:
            raise SystemExit(f"locattn {e}") from None
        if args.log:
            save_history(history, args.log)
        print(f"{args.output}: loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g} after "
              f"{len(history)} steps")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
