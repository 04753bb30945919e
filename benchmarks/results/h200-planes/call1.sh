#!/bin/bash
# Session 22, call 1 (one H200): working tree = one row of x as three int8 planes and the int4 products on
# the integer tensor cores (m16n8k32 u8 x s8) where the planes fit shared memory (qkv, o, gate/up of
# llama-8b; down keeps x as it is). int4 CUDA tests in the background while the trees compile; chain:
# base (planes) against main (6ca57b8's linear_int4_mma.cu).
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=benchmarks/results/h200-planes
nvidia-smi -L; date -u
(timeout 330 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py tests/kernels/test_linear_quant.py -k "int4 or gated" -p no:cacheprovider > $OUT/pytest-int4.txt 2>&1; echo pytest-int4 rc=$? >> $OUT/pytest-int4.txt) &
timeout 450 python3 benchmarks/kernel_variants.py --quant int4-norm-act --rounds 2 --run-timeout 60 \
  --variant-file main=kernels/csrc/linear_int4_mma.cu=$S/main-linear_int4_mma.cu.txt > $OUT/variants.md 2> $OUT/variants.err
echo rc=$?; tail -3 $OUT/variants.err
wait
grep -E "passed|failed|Error|assert" $OUT/pytest-int4.txt | tail -15
grep -E "^## |int4-norm" $OUT/variants.md
