"""Run a function on N local processes joined by a gloo process group (tests, benchmarks, CPU experiments).

``run(fn, world, *args, timeout=...)`` spawns ``world`` processes; each calls ``fn(rank, world, *args)`` after
``init_process_group("gloo")`` and returns a picklable value; the values come back in rank order. An exception
on any rank is re-raised here with its traceback; a hang fails after ``timeout`` seconds (the processes are
killed, the errors of the ranks that did finish are shown) instead of blocking.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir, threads, fn, args):
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    if threads:
        torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = {"ok": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _read(outdir: str, rank: int):
    f = os.path.join(outdir, f"rank{rank}.pt")
    return torch.load(f, weights_only=False) if os.path.exists(f) else None


def run(fn, world: int, *args, timeout: float = 120.0, threads: int = 1) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in its own gloo process (``threads``
    intra-op threads each; 0 keeps torch's default)."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir, threads, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.time() + timeout
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.time()))):
            if time.time() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                errors = [f"rank {r}:\n{res['error']}" for r in range(world)
                          if (res := _read(outdir, r)) is not None and "error" in res]
                raise TimeoutError(f"{world} processes did not finish within {timeout:.0f} s (a hang?)\n"
                                   + "\n".join(errors))
        results = []
        for r in range(world):
            res = _read(outdir, r)
            if res is None or "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error'] if res else 'no result'}")
            results.append(res["ok"])
        return results
