"""Sequence parallelism: the bytes each rank sends per attention site, and gloo timings on CPU processes.

For the video shapes of ``benchmarks/gpu_attention.py`` (30x48x80 tokens: 3-D neighborhood 7x15x15 and
tiled STA 2x8x8 / 3x3x5, 8 heads, head dim 128, bf16, batch 1), plus its 128x128 neighborhood and 64k 1-D
window, and 2 / 4 / 8 ranks:

1. **Bytes** (exact, from the plans ``locattn.parallel.planner`` makes; no process needed): what the busiest
   rank sends for one site's forward with the halo exchange, next to all-gather of k / v, ring attention
   (k / v passed P - 1 times) and Ulysses (all-to-all of q, k, v and out). The backward mirrors each.
2. **Time** (gloo, one CPU process per rank, ``--time-heads`` heads so that 8 processes fit in memory): the
   median wall time of the slowest rank for the halo exchange, the all-gather, the ring's P - 1 steps and
   Ulysses' four all-to-alls of the same tensors. Communication only: on this machine the ranks share 2 CPU
   cores (and other work: the load average is recorded), so the times show the ratio of schemes, not what a
   GPU interconnect does.
3. **One site's forward** (``sp_attention`` with the ``cpu`` implementation, small enough for CPU): the sharded
   forward with and without ``overlap`` (interior rows computed while the halo travels) next to the
   single-process op.

Usage::

    python benchmarks/sequence_parallel.py                  # table + timings for 2, 4, 8 ranks
    python benchmarks/sequence_parallel.py --quick          # tiny grids, 2 ranks (the test suite runs it)
    python benchmarks/sequence_parallel.py --ranks 2 4 --time-heads 2 --reps 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

from locattn.parallel.attention import start_halo  # noqa: E402
from locattn.parallel.launch import run as run_spmd  # noqa: E402
from locattn.parallel.planner import make_sharding, plan_attention, site_traffic  # noqa: E402
from locattn.parallel.sharding import to_json  # noqa: E402
from locattn.patterns import Layout, Neighborhood, Pattern, SlidingWindow, Tiled  # noqa: E402
from locattn.patterns.spec import HeadGroup, SiteSpec  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    pattern: Pattern
    grid: tuple[int, ...]
    heads: int
    dim: int = 128
    itemsize: int = 2  # bf16


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("na3d-6x8x10", Neighborhood(kernel=(3, 3, 5)), (6, 8, 10), 2, 16),
                Case("tiled3d-6x8x10", Tiled(tile=(2, 4, 4), window=(1, 1, 3)), (6, 8, 10), 2, 16)]
    g3 = (30, 48, 80)
    return [Case("na3d-30x48x80", Neighborhood(kernel=(7, 15, 15)), g3, 8),
            Case("tiled3d-30x48x80", Tiled(tile=(2, 8, 8), window=(3, 3, 5)), g3, 8),
            Case("na2d-128x128", Neighborhood(kernel=(17, 17)), (128, 128), 16),
            Case("sw1d-64k", SlidingWindow(window=1024), (65536,), 8)]


def _plan(case: Case, world: int, axis: int, rank: int = 0, group: str = ""):
    spec = SiteSpec((HeadGroup(None, case.pattern, Layout(grid=case.grid)),))
    align = case.pattern.align(axis, len(case.grid))  # as the graph pass does: shards on tile boundaries
    plan = plan_attention(spec, make_sharding(case.grid, axis, world, group, rank, align), 0, 0, label=case.name)
    assert not isinstance(plan, str), plan
    return plan


def byte_rows(quick: bool, ranks: list[int]) -> list[dict]:
    rows = []
    for case in cases(quick):
        for axis in range(len(case.grid) if len(case.grid) == 3 else 1):
            if len(case.grid) == 3 and axis == 2:
                continue
            for world in ranks:
                if world > case.grid[axis]:
                    continue
                plan = _plan(case, world, axis)
                t = site_traffic(plan, 1, case.heads, case.heads, case.dim, case.dim, case.itemsize)
                sh = plan.sharding
                halo_rows = max(max(r0 - e0, e1 - r1) for (r0, r1), (e0, e1) in zip(sh.rows, plan.ext))
                rows.append({"case": case.name, "axis": axis, "ranks": world,
                             "local_tokens": max(sh.local_tokens(r) for r in range(world)),
                             "rows_per_rank": max(r1 - r0 for r0, r1 in sh.rows), "halo_rows_one_side": halo_rows,
                             "halo_reach_ranks": t.halo_ranks, "halo_bytes": t.halo, "all_gather_bytes": t.all_gather,
                             "ring_bytes": t.ring, "ulysses_bytes": t.ulysses})
    return rows


# ---------------------------------------------------------------------------------------------------- timing


def _median_ms(fn, reps: int, group) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _time_worker(rank: int, world: int, quick: bool, heads: int, reps: int) -> list[dict]:
    out = []
    group = dist.group.WORLD
    for case in cases(quick):
        if world > case.grid[0]:
            continue
        plan = _plan(case, world, 0, rank)
        pj = to_json(plan)
        n = plan.sharding.local_tokens()
        most = max(plan.sharding.local_tokens(r) for r in range(world))
        k, v = (torch.randn(1, heads, n, case.dim).to(torch.float16) for _ in range(2))
        pad = torch.zeros(2, 1, heads, most, case.dim, dtype=torch.float16)
        pad[:, :, :, :n] = torch.stack([k, v])
        row = {"case": case.name, "ranks": world, "heads": heads}
        row["halo_ms"] = _median_ms(lambda: start_halo(pj, k, v).wait(), reps, group)
        every = [torch.empty_like(pad) for _ in range(world)]
        row["all_gather_ms"] = _median_ms(lambda: dist.all_gather(every, pad, group=group), reps, group)

        def ring():
            cur, nxt = pad, torch.empty_like(pad)
            for _ in range(world - 1):
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, (rank + 1) % world, group),
                                                 dist.P2POp(dist.irecv, nxt, (rank - 1) % world, group)]):
                    w.wait()
                cur, nxt = nxt, cur
        row["ring_ms"] = _median_ms(ring, reps, group)
        if heads % world == 0:
            a2a_in = torch.zeros(4, heads, most, case.dim, dtype=torch.float16)  # q, k, v, out
            a2a_out = torch.empty_like(a2a_in)

            def ulysses():
                for i in range(4):  # heads are split over ranks: rank r gets heads r*h/P.. of every rank's tokens
                    dist.all_to_all_single(a2a_out[i], a2a_in[i], group=group)
            try:
                row["ulysses_ms"] = _median_ms(ulysses, reps, group)
            except RuntimeError as e:  # a backend without all-to-all
                row["ulysses_ms"] = None
                row["ulysses_error"] = str(e).splitlines()[0]
        else:
            row["ulysses_ms"] = None
        out.append(row)
    return out


def time_rows(quick: bool, ranks: list[int], heads: int, reps: int) -> list[dict]:
    rows = []
    for world in ranks:
        per_rank = run_spmd(_time_worker, world, quick, heads, reps, timeout=1800)
        for i, row in enumerate(per_rank[0]):
            merged = dict(row)
            for key in ("halo_ms", "all_gather_ms", "ring_ms", "ulysses_ms"):
                vals = [r[i][key] for r in per_rank if r[i].get(key) is not None]
                merged[key] = max(vals) if vals else None   # the slowest rank
            rows.append(merged)
    return rows


def e2e_cases(quick: bool) -> list[Case]:
    """Sites small enough to compute on CPU: one site's forward, halo + attention, with and without overlap."""
    if quick:
        return [Case("na2d-16x16", Neighborhood(kernel=(5, 5)), (16, 16), 2, 32)]
    return [Case("na2d-64x64", Neighborhood(kernel=(13, 13)), (64, 64), 4, 64),
            Case("sw1d-16k", SlidingWindow(window=256), (16384,), 4, 64)]


def _e2e_worker(rank: int, world: int, quick: bool, reps: int) -> list[dict]:
    from locattn.parallel.ops import shard_local
    from locattn.parallel.sharding import TokenPlan

    out = []
    group = dist.group.WORLD
    for case in e2e_cases(quick):
        torch.manual_seed(0)
        layout = Layout(grid=case.grid)
        spec = SiteSpec((HeadGroup(None, case.pattern, layout),))
        q, k, v = (torch.randn(1, case.heads, layout.seq_len, case.dim) for _ in range(3))
        row = {"case": case.name, "ranks": world}
        if world == 1:
            sj = spec.to_json()
            row["single_ms"] = _median_ms(lambda: torch.ops.locattn.attention(q, k, v, None, None, 0.125, False, sj,
                                                                              ""), reps, group)
        else:
            for overlap in (False, True):
                sh = make_sharding(case.grid, 0, world, "", rank)
                plan = plan_attention(spec, sh, 0, 0, overlap=overlap, label=case.name)
                tp = TokenPlan(sh, 2)
                ql, kl, vl = (shard_local(t, tp) for t in (q, k, v))
                args = (0.125, False, spec.to_json(), "", to_json(plan))
                row["overlap_ms" if overlap else "halo_ms"] = _median_ms(
                    lambda: torch.ops.locattn.sp_attention(ql, kl, vl, *args), reps, group)
        out.append(row)
    return out


def e2e_rows(quick: bool, ranks: list[int], reps: int) -> list[dict]:
    rows = []
    for world in [1, *ranks]:
        per_rank = run_spmd(_e2e_worker, world, quick, reps, timeout=1800, threads=0 if world == 1 else 1)
        for i, row in enumerate(per_rank[0]):
            merged = dict(row)
            for key in ("halo_ms", "overlap_ms"):
                if key in row:
                    merged[key] = max(r[i][key] for r in per_rank)
            rows.append(merged)
    return rows


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 1e6:.1f}"


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--time-heads", type=int, default=8, help="heads of the timed tensors (fewer: less memory)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="the byte table only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ranks = args.ranks or ([2] if args.quick else [2, 4, 8])
    load0 = os.getloadavg()
    rows = byte_rows(args.quick, ranks)
    print("bytes sent per rank for one site's forward (busiest rank; bf16, batch 1, head dim 128):\n")
    print("| case | axis | ranks | rows/rank | halo rows | halo MB | all-gather MB | ring MB | Ulysses MB | "
          "halo / Ulysses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['halo_bytes'] / r['ulysses_bytes']:.2f}" if r["ulysses_bytes"] else "n/a"
        print(f"| {r['case']} | {r['axis']} | {r['ranks']} | {r['rows_per_rank']} | {r['halo_rows_one_side']}"
              f"{' (' + str(r['halo_reach_ranks']) + ' ranks away)' if r['halo_reach_ranks'] > 1 else ''} | "
              f"{_mb(r['halo_bytes'])} | {_mb(r['all_gather_bytes'])} | {_mb(r['ring_bytes'])} | "
              f"{_mb(r['ulysses_bytes'])} | {ratio} |")
    timed = []
    if not args.no_time:
        timed = time_rows(args.quick, ranks, 2 if args.quick else args.time_heads, 1 if args.quick else args.reps)
        print(f"\ngloo on CPU processes, communication only, {timed[0]['heads'] if timed else '?'} head(s), fp16, "
              f"median of {1 if args.quick else args.reps}, slowest rank (load average before "
              f"{load0[0]:.1f}, after {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs):\n")
        print("| case | ranks | halo ms | all-gather ms | ring ms | Ulysses ms |")
        print("|---|---|---|---|---|---|")
        for r in timed:
            print(f"| {r['case']} | {r['ranks']} | {_ms(r['halo_ms'])} | {_ms(r['all_gather_ms'])} | "
                  f"{_ms(r['ring_ms'])} | {_ms(r['ulysses_ms'])} |")
    e2e = []
    if not args.no_time:
        e2e = e2e_rows(args.quick, ranks, 1 if args.quick else args.reps)
        print(f"\none site's forward on CPU processes (sp_attention: halo exchange + cpu attention; fp32; the "
              f"single-process op with torch's default threads, each rank with 1 thread; slowest rank; load "
              f"average now {os.getloadavg()[0]:.1f}):\n")
        print("| case | ranks | single process ms | sharded ms | sharded, interior first ms |")
        print("|---|---|---|---|---|")
        single = {r["case"]: r["single_ms"] for r in e2e if r["ranks"] == 1}
        for r in e2e:
            if r["ranks"] > 1:
                print(f"| {r['case']} | {r['ranks']} | {_ms(single.get(r['case']))} | {_ms(r['halo_ms'])} | "
                      f"{_ms(r['overlap_ms'])} |")
    meta = {"torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_before": load0, "load_after": os.getloadavg(), "command": " ".join(sys.argv)}
    write_results("sequence_parallel", args.quick, meta, [{"bytes": rows, "time": timed, "e2e": e2e}], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
