#!/bin/bash
# Session 18, call 3 (one H200): int8 chain, main's GEMV (base) against the tensor-core GEMV staged through shared
# memory (smem: 4 warps a CTA; smemw2: 2 warps); then the int8 CUDA tests in the smem tree.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
V=kernels/csrc/linear_int8_gemv.cu
timeout 330 python3 benchmarks/kernel_variants.py --quant int8-norm-act --rounds 2 --run-timeout 120 --keep /tmp/trees \
  --variant-file smem=$V=scratch_gpu/s18/smem.cu --variant-file smemw2=$V=scratch_gpu/s18/smem.cu \
  --variant 'smemw2=kernels/csrc/linear_int8_gemv.cu:kWarps = 4; =>kWarps = 2; ' > $OUT/variants.md 2> $OUT/variants.err
echo variants rc=$? at $SECONDS s; tail -5 $OUT/variants.err
cp -r tests pyproject.toml /tmp/trees/smem/ && cd /tmp/trees/smem && PYTHONPATH=/tmp/trees/smem timeout 200 python3 -m pytest -q -m cuda tests/kernels/test_linear_quant.py -k "int8" -p no:cacheprovider > $OUT/pytest-int8-smem.txt 2>&1; echo pytest rc=$? at $SECONDS s
tail -3 $OUT/pytest-int8-smem.txt
grep -E "^## |int8" $OUT/variants.md | head -12
