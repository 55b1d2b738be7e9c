#!/usr/bin/env bash
# Paired A/B of the avx2 kernels: kernels_avx2.c of revision REV (A) and of
# the working tree (B) built into one program (tools/kernel_ab.c) and timed
# alternately; prints the median of the B/A ratios per kernel.  For
# revisions whose internal.h declares the kernels and kt_wmat as the
# working tree does.  Needs gcc and git.
# Usage: tools/kernel_ab.sh REV [experts=8] [m=48] [pairs=20] [bf16|i4s]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:?usage: tools/kernel_ab.sh REV [experts] [m] [pairs] [bf16|i4s]}
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/a"
git -C "$root" archive "$rev" libktmoe | tar -x -C "$tmp/a"
cflags="-O3 -std=c11 -D_GNU_SOURCE -DKTMOE_BUILDING -fno-math-errno -falign-loops=64 -mavx2 -mfma -mf16c"
for s in kt_dot_avx2 kt_dot_many_avx2 kt_outer_avx2 kt_outer_pack_avx2 kt_dot_tpack_avx2 \
         kt_dot_fold_ok kt_dot_col_scales kt_quant_act_avx2 \
         kt_qdot_avx2 kt_act_fwd_avx2 kt_act_bwd_avx2 kt_kernels_avx2; do
  echo "#define $s B_$s"
done > "$tmp/rename.h"
gcc $cflags -I"$tmp/a/libktmoe/include" -I"$tmp/a/libktmoe/src" \
  -c "$tmp/a/libktmoe/src/kernels/avx2/kernels_avx2.c" -o "$tmp/a.o"
gcc $cflags -include "$tmp/rename.h" -I"$root/libktmoe/include" -I"$root/libktmoe/src" \
  -c "$root/libktmoe/src/kernels/avx2/kernels_avx2.c" -o "$tmp/b.o"
gcc $cflags -I"$root/libktmoe/include" -I"$root/libktmoe/src" "$root/tools/kernel_ab.c" \
  "$tmp/a.o" "$tmp/b.o" "$root/libktmoe/src/error.c" "$root/libktmoe/src/quant.c" -lm \
  -o "$tmp/kernel_ab"
"$tmp/kernel_ab" "$@"
