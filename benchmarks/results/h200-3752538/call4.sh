#!/bin/bash
# Session 23, call 4 (one H200, a fresh machine): bf16, int4 and int4 with --fuse-rope-into-attention built at
# once, then one bench process of bf16 and int4 and one of the fused int4 build right after.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=f044de0
R=$PWD/out/e2e23c; mkdir -p $R; nvidia-smi -L; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
for q in none int4; do
  PYTHONPATH=$PWD python3 -m oiv2compile bench llama-8b --quant $q --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-$q > $R/build-$q.log 2>&1 &
done
PYTHONPATH=$PWD python3 -m oiv2compile bench llama-8b --quant int4 --fuse-rope-into-attention --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-int4-rope > $R/build-int4-rope.log 2>&1 &
wait
echo "builds done at $SECONDS s"; for f in $R/build-*.log; do tail -n 2 $f | cut -c1-200; done
PYTHONPATH=$PWD timeout $((520 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant none,int4 --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b-b > $R/bench-b.log 2>&1
echo "bench rc=$? at $SECONDS s"
PYTHONPATH=$PWD timeout $((590 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant int4 --fuse-rope-into-attention --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b-rope > $R/bench-rope.log 2>&1
echo "bench rope rc=$? at $SECONDS s"
mkdir -p $OUT/b $OUT/rope; cp $R/llama-8b-b/bench.* $OUT/b/ 2>/dev/null; cp $R/llama-8b-rope/bench.* $OUT/rope/ 2>/dev/null; cp $R/*.log $OUT/
grep -E "^\| inductor" $R/llama-8b-b/bench.md $R/llama-8b-rope/bench.md
