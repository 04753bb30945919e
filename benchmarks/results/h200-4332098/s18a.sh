#!/bin/bash
# Session 18, call 1 (one H200): the int8 GEMV on the tensor cores (working tree) against the CUDA-core
# form (old), and two shapes of it; int8 CUDA tests meanwhile; then per-shape at M = 1 and 4.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
(timeout 330 python3 -m pytest -q -m cuda tests/kernels/test_linear_quant.py -k "int8" -p no:cacheprovider > $OUT/pytest-int8.txt 2>&1; echo pytest-int8 rc=$? >> $OUT/pytest-int8.txt) &
V=kernels/csrc/linear_int8_gemv.cu
timeout 400 python3 benchmarks/kernel_variants.py --quant int8-norm-act --rounds 2 --run-timeout 60 \
  --variant-file old=$V=scratch_gpu/s18/old_gemv.cu --variant-file w4u4=$V=scratch_gpu/s18/w4u4.cu \
  --variant-file w8u4=$V=scratch_gpu/s18/w8u4.cu > $OUT/variants.md 2> $OUT/variants.err
echo variants rc=$? at $SECONDS s; tail -5 $OUT/variants.err
wait
echo tests done at $SECONDS s
timeout $((560 - SECONDS)) python3 benchmarks/bench_kernels.py --models llama-8b --m 1,4 --candidates "bf16 F.linear,linear_int8_gemv" --repeats 50 --out $OUT/kernels.json > $OUT/kernels.md 2> $OUT/kernels.err
echo kernels rc=$? at $SECONDS s; tail -3 $OUT/kernels.err
tail -4 $OUT/pytest-int8.txt
grep -E "^## |int8" $OUT/variants.md | head -30
grep -E "^\|" $OUT/kernels.md | head -30
