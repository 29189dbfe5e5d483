#!/bin/bash
# Static sm_90 SASS instructions per loop iteration (full-block loop / partial-block loop) of the kernels on the
# tiles the RESULTS.md tables quote (d=128, bf16), by tools/compile_sm90.py --loops of the tree TREE (default:
# this checkout). Instruction counts are predictions, not time. No GPU needed; needs a Triton with the NVIDIA
# backend (for the device's triton 3.6: pip install --no-deps --target /tmp/t36 triton==3.6.0, PYTHONPATH=/tmp/t36).
#   tools/sass_table.sh [TREE] [flags for the rows with partial blocks, e.g. --nopad 3]
T=$(cd "${1:-.}" && pwd); shift
X="$*"
# run N ARGS: the first N loops (1: all-full plans, whose kernels have no partial loop; 2: full / partial)
run() { local n=$1; shift; (cd "$T" && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$T" python tools/compile_sm90.py \
  --d 128 --loops "$@" 2>&1) | awk -v n="$n" '/loop of/ {printf "%s%s", sep, $3; sep="/"; if (++k == n) exit} END {print ""}'; }
echo "fwd dense 128x128/8w/3s:         $(run 1 --family fwd --ndim 0 --block 128 128 --warps 8 --stages 3 --linear --ranges --no-partial)"
echo "fwd dense 128x64/8w/4s:          $(run 1 --family fwd --ndim 0 --block 128 64 --warps 8 --stages 4 --linear --ranges --no-partial)"
echo "fwd 1-D window 128x64/8w/4s:     $(run 2 --family fwd --ndim 1 --block 128 64 --warps 8 --stages 4 --linear --ranges --window-only $X)"
echo "fwd 2-D neighb. 128x64/8w/4s:    $(run 2 --family fwd --ndim 2 --block 128 64 --warps 8 --stages 4 --tile 8 16 --ktile 8 8 --ranges --window-only $X)"
echo "fwd 3-D neighb. 128x128/8w/3s:   $(run 2 --family fwd --ndim 3 --block 128 128 --warps 8 --stages 3 --tile 2 8 8 --ranges --window-only $X)"
echo "fwd 3-D tiled 128x128/8w/3s:     $(run 1 --family fwd --ndim 3 --block 128 128 --warps 8 --stages 3 --tile 2 8 8 --ranges --no-partial)"
echo "dQ dense 64x32/4w/3s:            $(run 1 --family dq --ndim 0 --block 64 32 --warps 4 --stages 3 --linear --ranges --no-partial)"
echo "dQ 1-D window 64x32/4w/3s:       $(run 2 --family dq --ndim 1 --block 64 32 --warps 4 --stages 3 --linear --ranges --window-only $X)"
echo "dQ 2-D neighb. 64x32/4w/3s:      $(run 2 --family dq --ndim 2 --block 64 32 --warps 4 --stages 3 --tile 8 8 --ktile 4 8 --ranges --window-only $X)"
echo "dK/dV dense 64x128/8w/2s:        $(run 1 --family dkdv --ndim 0 --block 64 128 --warps 8 --stages 2 --linear --ranges --no-partial)"
echo "dK/dV 1-D window 64x128/8w/2s:   $(run 2 --family dkdv --ndim 1 --block 64 128 --warps 8 --stages 2 --linear --ranges --window-only $X)"
echo "dK/dV 2-D neighb. 64x128/8w/2s:  $(run 2 --family dkdv --ndim 2 --block 64 128 --warps 8 --stages 2 --tile 8 8 --ktile 8 16 --ranges --window-only $X)"
echo "dK/dV 3-D neighb. 64x128/8w/2s:  $(run 2 --family dkdv --ndim 3 --block 64 128 --warps 8 --stages 2 --tile 1 8 8 --ktile 2 8 8 --ranges --window-only $X)"
