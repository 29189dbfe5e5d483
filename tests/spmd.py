"""Run a function on N CPU processes with the gloo backend (tests of sequence parallelism).

``run(fn, world, *args, timeout=...)`` spawns ``world`` processes, each calls ``fn(rank, world, *args)`` after
``init_process_group("gloo")`` and returns a picklable value; the list of values comes back by rank. An
exception on any rank is re-raised here with its traceback; a hang fails after ``timeout`` seconds (the
processes are killed) instead of blocking CI.
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


def _worker(rank, world, port, outdir, fn, args):
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = {"ok": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run(fn, world: int, *args, timeout: float = 120.0):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.time() + timeout
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.time()))):
            if time.time() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                errors = []
                for r in range(world):
                    f = os.path.join(outdir, f"rank{r}.pt")
                    if os.path.exists(f):
                        res = torch.load(f, weights_only=False)
                        errors += [f"rank {r}:\n{res['error']}"] if "error" in res else []
                raise TimeoutError(f"spmd: {world} processes did not finish within {timeout:.0f} s (a hang?)\n"
                                   + "\n".join(errors))
        results = []
        for r in range(world):
            res = torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            if "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
            results.append(res["ok"])
        return results
