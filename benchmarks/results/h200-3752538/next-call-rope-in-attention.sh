#!/bin/bash
# Prepared in the twenty-third session, NOT RUN: is the rotary kernel inside the attention
# (--fuse-rope-into-attention) faster end to end for bf16 and int8 too, as it was for llama-8b int4 (601.5
# against 585.7 tok/s, call 4)? A cheap probe on llama-1b (16 layers: builds take a fraction of an 8B's):
# bf16, int8 and int4, each built with and without the fusion (six builds at once), then three bench
# processes in the order without, with, without, so that a drift of the card shows. About 5 minutes. If the
# fusion wins for all three, llama-8b bf16 and int8 with and without it are the next call (two builds at
# once each), before the default changes. From the repository root on one H200.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
R=$PWD/out/rope1b; mkdir -p $R; nvidia-smi -L; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
for q in none int8 int4; do
  for f in "" --fuse-rope-into-attention; do
    PYTHONPATH=$PWD timeout 400 python3 -m oiv2compile bench llama-1b --quant $q $f --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-$q$f > $R/build-$q$f.log 2>&1 &
  done
done
wait
echo "builds done at $SECONDS s"
for run in a fused b; do
  flag=""; [ $run = fused ] && flag=--fuse-rope-into-attention
  PYTHONPATH=$PWD timeout 120 python3 -m oiv2compile bench llama-1b --quant none,int8,int4 $flag --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/bench-$run > $R/bench-$run.log 2>&1
  echo "bench $run rc=$? at $SECONDS s"
done
mkdir -p $OUT/a $OUT/fused $OUT/b; for run in a fused b; do cp $R/bench-$run/bench.json $OUT/$run/ 2>/dev/null; done; cp $R/*.log $OUT/
grep -E "^\| inductor" $R/bench-a/bench.md $R/bench-fused/bench.md $R/bench-b/bench.md
