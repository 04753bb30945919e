#!/bin/bash
# Session 17, call 2 (one H200): working tree = sum_x with 16-byte loads (sum16). int4 CUDA tests in the background
# while the variant trees compile; then the chain: base (sum16), orig (main's sum_x), inter (weights read
# stage-major: timing only), nomath, nomathinter.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
(timeout 300 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py tests/kernels/test_linear_quant.py -k "int4 or gated" -p no:cacheprovider > $OUT/pytest-int4.txt 2>&1; echo pytest-int4 rc=$? >> $OUT/pytest-int4.txt) &
V=""
for v in orig inter nomath nomathinter; do V="$V --variant-file $v=kernels/csrc/linear_int4_mma.cu=scratch_gpu/s17/var2/$v.cu"; done
timeout 520 python3 benchmarks/kernel_variants.py --quant int4-norm-act --rounds 2 --run-timeout 60 $V > $OUT/variants2.md 2> $OUT/variants2.err
echo rc=$?; tail -3 $OUT/variants2.err
wait
tail -3 $OUT/pytest-int4.txt
grep -E "^## |int4-norm" $OUT/variants2.md
