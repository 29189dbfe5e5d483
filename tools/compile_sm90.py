"""Compile locattn's Triton kernels offline for a GPU target (default sm_90) and report compile time,
registers, spills and shared memory: no GPU needed (Triton's bundled ptxas).

    python tools/compile_sm90.py                       # bf16, head dims 64/128/256, default tiles
    python tools/compile_sm90.py --d 128 --ndim 2 --family fwd --block 128 64 --warps 8 --stages 2
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from locattn.codegen import triton_kernels as K  # noqa: E402
from locattn.codegen.triton_impl import CONFIG_SPACE, KernelConfig, _pow2, grid_code, head_dim_bucket  # noqa: E402

KERNELS = {"fwd": K.attn_fwd, "dq": K.attn_bwd_dq, "dkdv": K.attn_bwd_dkdv, "fwd_tma": K.attn_fwd_tma}
# pointer arguments and their element types (the rest are integer sizes/strides, or the fp32 scale)
PTR_INPUT = {"Q", "K", "V", "dO", "Out"}
PTR_OUTPUT_SAME = {"dQ", "dK", "dV"}
PTR_F32 = {"LSE", "LD", "dBias", "Bias"}
PTR_I32 = {"q_slots", "k_slots", "k_u", "kv_ptr", "kv_split", "kv_idx", "qb_ptr", "qb_split",
           "qb_idx", "kv_rng", "qb_rng", "Visits", "head_map"}
PTR_I64 = {"q_iv"}
PTR_U8 = {"Mask"}


def compile_one(family: str, d: int, ndim: int, cfg: KernelConfig, dtype: str = "bf16", causal: bool = False,
                linear: bool = False, ranges: bool = False, tile: tuple[int, ...] | None = None, partial: bool = True,
                window_only: bool = False, ktile: tuple[int, ...] | None = None, nopad: int = 0,
                per_bh: bool = False, dyn: bool = False, target=GPUTarget("cuda", 90, 32)):
    """Compile one kernel family. ``linear`` / ``tile`` (a power-of-two spatial tile: GRID addressing for
    queries, and for keys unless ``ktile`` gives theirs) / ``ranges`` select the table-free addressing modes
    (see triton_kernels' glossary)."""
    addr = grid_code(tile) if tile else int(linear)
    ktile = ktile or tile
    kaddr = grid_code(ktile) if ktile else addr
    if cfg.tma:  # the TMA forward (all-full plans, computed addressing): descriptors instead of q/k/v pointers
        family = "fwd_tma"
        assert addr, "the TMA forward needs computed addressing (--linear or --tile)"
    fn = KERNELS[family]
    names = list(inspect.signature(fn.fn).parameters)
    sig, const = {}, {}
    bd = _pow2(d)
    cvals = dict(D=d, DV=d, NDIM=ndim, CAUSAL=causal, HAS_MASK=False, HAS_BIAS=False, NEED_DBIAS=False,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bd, VISIT=False,
                 PRECISION="tf32", UPCAST=False, QADDR=addr, KADDR=kaddr, RANGES=ranges,
                 HAS_GLOBALS=False, HAS_PARTIAL=partial, FOLD=True, WS=cfg.ws, WINDOW_ONLY=window_only,
                 NOPAD=nopad, PER_BH=per_bh or dyn, DYN=dyn, DYN_CAUSAL=dyn and causal)
    for n in names:
        if n.startswith("desc_"):  # block shape of _tma_descriptor: LINEAR [1, 1, B, D], GRID [(1,) 1, *tile, D]
            block, t = (cfg.block_m, tile) if n == "desc_q" else (cfg.block_n, ktile)
            lead = [1, 1, block] if addr == 1 else [1] * (4 - len(t)) + list(t)
            sig[n] = f"tensordesc<{dtype}[{', '.join(map(str, lead + [bd]))}]>"
        elif n in cvals:
            sig[n] = "constexpr"
            const[(names.index(n),)] = cvals[n]
        elif n in PTR_INPUT or n in PTR_OUTPUT_SAME:
            sig[n] = f"*{dtype}"
        elif n in PTR_F32:
            sig[n] = "*fp32"
        elif n in PTR_I32:
            sig[n] = "*i32"
        elif n in PTR_I64:
            sig[n] = "*i64"
        elif n in PTR_U8:
            sig[n] = "*u8"
        elif n == "sm_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    # strides of the last dim are 1 in practice: specialise like the launcher does
    # like the launcher: pointers are 16-byte aligned, the innermost strides are 1 (specialised to the constant),
    # the other strides of [B, H, S, D] tensors with D a multiple of 16 are divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    for n in names:
        if n.startswith("stride_") and n.endswith("d"):
            sig[n] = "constexpr"
            const[(names.index(n),)] = 1
        elif n.startswith("stride_") and n[-1] in "bhsqk" and d % 16 == 0:
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, const, attrs)
    t = time.perf_counter()
    ck = triton.compile(src, target=target, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    dt = time.perf_counter() - t
    return dt, ck


def _cubin_tool(ck, tool: str, *args: str) -> str:
    """stdout of one of Triton's bundled CUDA tools (``cuobjdump``, ``nvdisasm``) run on the kernel's cubin."""
    import os
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(os.path.dirname(nv.__file__), "bin", tool), *args, f.name],
                              capture_output=True, text=True).stdout


def static_stats(ck) -> dict:
    """What the compiled kernel says without a GPU: registers and local (spill) memory per thread from
    ``cuobjdump --dump-resource-usage`` (Triton's bundled copy), and PTX instruction counts: 32-bit global loads
    (index / table loads), 16-byte async copies (K/V tiles), wgmma, and the predicate's setp / selp."""
    import re

    ptx = ck.asm["ptx"]
    out = {name: len(re.findall(pat, ptx)) for name, pat in (
        ("ld.global.b32", r"ld\.global\.b32"), ("cp.async", r"cp\.async\.c[ag]\.shared"),
        ("wgmma", r"wgmma\.mma_async"), ("setp", r"(?m)^\s*setp\."), ("selp", r"(?m)^\s*selp\."),
        ("tma", r"cp\.async\.bulk\.tensor"), ("setmaxnreg", r"setmaxnreg"))}
    out["warps"] = ck.metadata.num_warps  # 3 warp groups' worth when warp specialization applied
    res = _cubin_tool(ck, "cuobjdump", "--dump-resource-usage")
    for name in ("REG", "LOCAL"):
        m = re.search(rf"{name}:(\d+)", res)
        if m:
            out[name.lower()] = int(m.group(1))
    return out


def sass_loops(ck) -> list[tuple[int, dict[str, int]]]:
    """The kernel's loops in its SASS (``nvdisasm``, Triton's bundled copy): for every backward branch, the
    number of instructions from its target to it and the most frequent opcodes — the static cost of one
    iteration (a forward kernel has its full-block loop, then its partial-block loop)."""
    import collections
    import re

    sass = _cubin_tool(ck, "nvdisasm", "-c")
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
        elif re.match(r"^\.L_x_\d+:", line.strip()):
            labels[line.strip()[:-1]] = len(ins)
    loops = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), i + 1) < i:  # a backward branch: a loop
            body = ins[labels[m.group(1)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
            loops.append((len(body), dict(ops.most_common(10))))
    return loops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="*", default=["fwd", "dq", "dkdv"])
    ap.add_argument("--d", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--ndim", type=int, nargs="*", default=[1])
    ap.add_argument("--block", type=int, nargs=2)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="every config of CONFIG_SPACE, not only the first")
    ap.add_argument("--linear", action="store_true", help="LINEAR slots (dense / plain 1-D plans)")
    ap.add_argument("--ranges", action="store_true", help="RANGES loops (run-structured plans)")
    ap.add_argument("--tile", type=int, nargs="*", help="GRID addressing with this spatial tile (2-D/3-D)")
    ap.add_argument("--ktile", type=int, nargs="*", help="the keys' spatial tile when it differs from --tile")
    ap.add_argument("--no-partial", action="store_true", help="HAS_PARTIAL off: an all-full plan (dense, exact tiles)")
    ap.add_argument("--window-only", action="store_true",
                    help="WINDOW_ONLY partial blocks (forward / dQ: the window test alone, no padding test)")
    ap.add_argument("--nopad", type=int, default=0, choices=range(4),
                    help="NOPAD bits: 1 no padding query slot, 2 no padding key slot (3: neither side has padding)")
    ap.add_argument("--loops", action="store_true", help="also print each SASS loop's size and main opcodes")
    ap.add_argument("--tma", action="store_true", help="the TMA forward (attn_fwd_tma; needs --linear or --tile)")
    ap.add_argument("--ws", action="store_true", help="the TMA forward with warp specialization")
    ap.add_argument("--per-bh", action="store_true", help="per-(batch, head) / per-head-group tables (PER_BH)")
    ap.add_argument("--dyn", action="store_true", help="dynamic tables: PER_BH with the WHOLE bit (DYN)")
    ap.add_argument("--causal", action="store_true", help="the site's is_causal (and DYN_CAUSAL with --dyn)")
    args = ap.parse_args()
    for d in args.d:
        for fam in args.family:
            space = CONFIG_SPACE[(fam, head_dim_bucket(d))]
            cfgs = ([KernelConfig(*args.block, args.warps, args.stages, tma=args.tma or args.ws, ws=args.ws)]
                    if args.block
                    else space if args.all else space[:1])
            for cfg in cfgs:
                for ndim in args.ndim:
                    dt, ck = compile_one(fam, d, ndim, cfg, linear=args.linear, ranges=args.ranges,
                                         tile=tuple(args.tile) if args.tile else None,
                                         ktile=tuple(args.ktile) if args.ktile else None,
                                         partial=not args.no_partial, window_only=args.window_only,
                                         nopad=args.nopad, per_bh=args.per_bh, dyn=args.dyn, causal=args.causal)
                    st = static_stats(ck)
                    print(f"{fam:5s} d={d:<3d} ndim={ndim} {cfg}: {dt:6.1f} s  shared {ck.metadata.shared}  "
                          + "  ".join(f"{k} {v}" for k, v in st.items()), flush=True)
                    if args.loops:
                        for n, ops in sass_loops(ck):
                            print(f"    loop of {n} SASS instructions: {ops}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
