#!/bin/bash
# Session 18, call 2 (one H200): int8 GEMV on the tensor cores, adjacent steps + scales loaded early (working tree)
# against the first tensor-core form (inter), the CUDA-core form (old), and unroll/warps shapes; int8 tests meanwhile;
# then per-shape at M = 1.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
(timeout 300 python3 -m pytest -q -m cuda tests/kernels/test_linear_quant.py -k "int8" -p no:cacheprovider > $OUT/pytest-int8.txt 2>&1; echo pytest-int8 rc=$? >> $OUT/pytest-int8.txt) &
V=kernels/csrc/linear_int8_gemv.cu
timeout 420 python3 benchmarks/kernel_variants.py --quant int8-norm-act --rounds 2 --run-timeout 120 \
  --variant-file old=$V=scratch_gpu/s18/old_gemv.cu --variant-file inter=$V=scratch_gpu/s18/inter.cu \
  --variant 'u4=kernels/csrc/linear_int8_gemv.cu:kUnroll = 2; =>kUnroll = 4; ' \
  --variant 'w4u4=kernels/csrc/linear_int8_gemv.cu:kUnroll = 2; =>kUnroll = 4; ' \
  --variant 'w4u4=kernels/csrc/linear_int8_gemv.cu:kWarps = 8; =>kWarps = 4; ' > $OUT/variants.md 2> $OUT/variants.err
echo variants rc=$? at $SECONDS s; tail -5 $OUT/variants.err
wait
echo tests done at $SECONDS s
timeout $((560 - SECONDS)) python3 benchmarks/bench_kernels.py --models llama-8b --m 1,4 --candidates "bf16 F.linear,linear_int8_gemv" --repeats 50 --out $OUT/kernels.json > $OUT/kernels.md 2> $OUT/kernels.err
echo kernels rc=$? at $SECONDS s; tail -3 $OUT/kernels.err
tail -4 $OUT/pytest-int8.txt
grep -E "^## |int8" $OUT/variants.md | head -30
grep -E "gemv|F.linear|copy" $OUT/kernels.md | head -30
