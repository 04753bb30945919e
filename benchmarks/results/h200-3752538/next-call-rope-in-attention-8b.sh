#!/bin/bash
# Prepared in the twenty-third session, NOT RUN: llama-8b with and without --fuse-rope-into-attention for one
# quantization (QUANT=none or int8; int4 was measured in call 4: +2.7%), both built at once, then three bench
# processes in the order without, with, without. About 7 minutes. Run after next-call-rope-in-attention.sh, if
# the fusion won there. From the repository root on one H200: QUANT=none bash THIS.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
Q=${QUANT:-none}; R=$PWD/out/rope8b-$Q; mkdir -p $R; nvidia-smi -L; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
for f in "" --fuse-rope-into-attention; do
  PYTHONPATH=$PWD timeout 420 python3 -m oiv2compile bench llama-8b --quant $Q $f --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build$f > $R/build$f.log 2>&1 &
done
wait
echo "builds done at $SECONDS s"
for run in a fused b; do
  flag=""; [ $run = fused ] && flag=--fuse-rope-into-attention
  PYTHONPATH=$PWD timeout 90 python3 -m oiv2compile bench llama-8b --quant $Q $flag --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/bench-$run > $R/bench-$run.log 2>&1
  echo "bench $run rc=$? at $SECONDS s"
done
mkdir -p $OUT/a $OUT/fused $OUT/b; for run in a fused b; do cp $R/bench-$run/bench.json $OUT/$run/ 2>/dev/null; done; cp $R/*.log $OUT/
grep -E "^\| inductor" $R/bench-a/bench.md $R/bench-fused/bench.md $R/bench-b/bench.md
