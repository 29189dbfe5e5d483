"""locattn demo: compile a DiT-like model with a policy, show what was rewritten, its error and its speed.

    python examples/demo.py [--size 128] [--policy examples/dit_policy.toml] [--reps 5]
    python examples/demo.py --device cuda --dtype bfloat16 --size 256     # on a GPU: the Triton kernels
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import locattn  # noqa: E402
from dit_model import TinyDiT  # noqa: E402


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, x, reps):
    t0 = time.perf_counter()
    with torch.no_grad():
        y = fn(x)  # first call compiles
    _sync(x)
    first = time.perf_counter() - t0
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            _sync(x)
            times.append(time.perf_counter() - t0)
    return y, first, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128, help="latent height/width (tokens = (size/2)^2)")
    ap.add_argument("--policy", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_policy.toml"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = TinyDiT(layers=args.layers).eval().to(args.device, dtype)
    x = torch.randn(1, 4, args.size, args.size).to(args.device, dtype)
    where = torch.cuda.get_device_name() if x.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"TinyDiT: {args.layers} blocks, {(args.size // 2) ** 2} tokens, {args.dtype}, torch {torch.__version__}, "
          f"{where}\n")

    report = locattn.explain(model, x, policy=args.policy)
    print(report, "\n")

    with torch.no_grad():
        eager = model(x)
    torch._dynamo.reset()
    y_def, c_def, t_def = timed(torch.compile(model), x, args.reps)
    torch._dynamo.reset()
    ours = torch.compile(model, backend="locattn", options={"policy": args.policy})
    y_ours, c_ours, t_ours = timed(ours, x, args.reps)
    torch._dynamo.reset()
    dense = torch.compile(model, backend="locattn")
    y_dense, _, t_dense = timed(dense, x, args.reps)

    print(f"{'variant':44s} {'forward ms':>10s} {'compile s':>10s} {'max |err| vs eager':>19s}")
    print(f"{'torch.compile (inductor, default)':44s} {t_def * 1e3:10.1f} {c_def:10.1f} "
          f"{(y_def - eager).abs().max().item():19.2e}")
    print(f"{'locattn, dense policy (exact)':44s} {t_dense * 1e3:10.1f} {'':>10s} "
          f"{(y_dense - eager).abs().max().item():19.2e}")
    print(f"{'locattn, ' + os.path.basename(args.policy):44s} {t_ours * 1e3:10.1f} {c_ours:10.1f} "
          f"{(y_ours - eager).abs().max().item():19.2e}  (local attention changes the model)")
    print(f"\nspeedup of the policy vs torch.compile default: {t_def / t_ours:.2f}x "
          f"(dense policy: {t_def / t_dense:.2f}x)")
    print("counters:", locattn.counters())


if __name__ == "__main__":
    main()
