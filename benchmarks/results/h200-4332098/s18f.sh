#!/bin/bash
# Session 18, call 5 (one H200, last ~5 min): main's CUDA-core int8 GEMV (base) against two rows a warp (x converted
# once for both); then the int8 CUDA tests in the two_rows tree if time is left.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
timeout 200 python3 benchmarks/kernel_variants.py --quant int8-norm-act --rounds 2 --run-timeout 60 --keep /tmp/trees \
  --variant-file two_rows=kernels/csrc/linear_int8_gemv.cu=scratch_gpu/s18/two_rows.cu > $OUT/variants.md 2> $OUT/variants.err
echo variants rc=$? at $SECONDS s; tail -3 $OUT/variants.err
grep -E "^## |int8" $OUT/variants.md | head -12
cp -r tests pyproject.toml /tmp/trees/two_rows/ && cd /tmp/trees/two_rows && PYTHONPATH=/tmp/trees/two_rows timeout $((255 - SECONDS)) python3 -m pytest -q -m cuda tests/kernels/test_linear_quant.py -k "int8_gemv" -p no:cacheprovider > $OUT/pytest-int8-two-rows.txt 2>&1; echo pytest rc=$? at $SECONDS s
tail -3 $OUT/pytest-int8-two-rows.txt
