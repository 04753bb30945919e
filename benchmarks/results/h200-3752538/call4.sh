#!/bin/bash
# Session 23, call 4 (one H200, right after call 3): int4 llama-8b built with --fuse-rope-into-attention,
# then one bench process of call 3's bf16 and int4 artifacts (if the machine kept them) and one of the fused
# int4 build right after.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=f044de0
R=$PWD/out/e2e23; mkdir -p $R; ls $R/cache 2>&1 | head; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
PYTHONPATH=$PWD timeout 420 python3 -m oiv2compile bench llama-8b --quant int4 --fuse-rope-into-attention --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-int4-rope > $R/build-int4-rope.log 2>&1
echo "build rc=$? at $SECONDS s"; tail -n 2 $R/build-int4-rope.log | cut -c1-200
if [ $SECONDS -lt 480 ] && ls $R/cache | grep -q .; then
  PYTHONPATH=$PWD timeout $((540 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant none,int4 --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b-b > $R/bench-b.log 2>&1
  echo "bench rc=$? at $SECONDS s"
fi
PYTHONPATH=$PWD timeout $((590 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant int4 --fuse-rope-into-attention --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b-rope > $R/bench-rope.log 2>&1
echo "bench rope rc=$? at $SECONDS s"
mkdir -p $OUT/b $OUT/rope; cp $R/llama-8b-b/bench.* $OUT/b/ 2>/dev/null; cp $R/llama-8b-rope/bench.* $OUT/rope/ 2>/dev/null; cp $R/*.log $OUT/
grep -E "^\| inductor" $R/llama-8b-b/bench.md $R/llama-8b-rope/bench.md
