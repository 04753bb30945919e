#!/bin/bash
# Session 23, call 5: next-call-int4-pairs.sh cut to the device time left (one round, shorter timeouts).
# between the two CTAs of a cluster (wip-int4-pairs.patch.txt; applies to main at the end of that session).
# Each CTA of a pair reads x's planes and group sums for its half of K only (half the pass over x, which cost
# 94 us a step), and the pairs take whole blocks (llama-8b q/k/v: 2-3 blocks a pair against 1-2 a CTA); at
# the end each CTA writes every other output of the pair, adding the other CTA's sums (and the norm's sum of
# squares) read from its shared memory. The int4 CUDA tests of the patched tree in the background while the
# trees compile, then the chain: main against pairs, two rounds. About 5 minutes. From the repository root.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
D=benchmarks/results/h200-3752538
ROOT=$PWD; T=$(mktemp -d); cp -r oiv2compile tests pyproject.toml $T/ && (cd $T && git apply $ROOT/$D/wip-int4-pairs.patch.txt) || exit 1
nvidia-smi -L; date -u
(cd $T && PYTHONPATH=$T timeout 200 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py tests/kernels/test_linear_quant.py -k "int4 or gated" -p no:cacheprovider > $OUT/pytest-pairs.txt 2>&1; echo pytest rc=$? >> $OUT/pytest-pairs.txt) &
K=kernels/csrc
PYTHONPATH=$PWD timeout 200 python3 benchmarks/kernel_variants.py --quant int4-norm-act --rounds 1 --run-timeout 60 \
  --variant-file pairs=$K/linear_int4_mma.cu=$T/oiv2compile/$K/linear_int4_mma.cu \
  --variant-file pairs=$K/gemv_common.cuh=$T/oiv2compile/$K/gemv_common.cuh > $OUT/variants.md 2> $OUT/variants.err
echo rc=$? at $SECONDS s; tail -3 $OUT/variants.err
wait
grep -E "^FAILED|passed|failed" $OUT/pytest-pairs.txt | tail -8
grep -E "^## |int4-norm" $OUT/variants.md
