#!/bin/bash
# Session 17, call 1 (one H200): what the x-sum pass costs in the chain. nosum (no pass), sum8 (an eighth of x),
# hold2 (producer issues 2 stages, then waits for the consumers' sums), sum16 (16-byte loads, correct numerics).
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
V=""
for v in nosum sum8 hold2 sum16; do V="$V --variant-file $v=kernels/csrc/linear_int4_mma.cu=scratch_gpu/s17/var/$v.cu"; done
timeout 560 python3 benchmarks/kernel_variants.py --quant int4-norm-act --rounds 2 --run-timeout 60 $V > $OUT/variants1.md 2> $OUT/variants1.err
echo rc=$?; tail -3 $OUT/variants1.err
grep -E "^## |int4|^\|" $OUT/variants1.md
