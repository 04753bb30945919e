#!/bin/bash
# Session 17, call 3 (one H200): working tree = one row of x kept in shared memory by the x-sum pass (bf16 as is)
# and read by LDS in the products. int4 CUDA tests in the background while the trees compile; chain: base (xsm) vs
# noxsm (7a52c13).
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
(timeout 330 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py tests/kernels/test_linear_quant.py -k "int4 or gated" -p no:cacheprovider > $OUT/pytest-int4.txt 2>&1; echo pytest-int4 rc=$? >> $OUT/pytest-int4.txt) &
timeout 450 python3 benchmarks/kernel_variants.py --quant int4-norm-act --rounds 2 --run-timeout 60 \
  --variant-file noxsm=kernels/csrc/linear_int4_mma.cu=scratch_gpu/s17/noxsm.cu > $OUT/variants3.md 2> $OUT/variants3.err
echo rc=$?; tail -3 $OUT/variants3.err
wait
tail -3 $OUT/pytest-int4.txt
grep -E "^## |int4-norm" $OUT/variants3.md
