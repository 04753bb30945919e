#!/bin/bash
# Session 18, call 4 (one H200): llama-8b bf16/int8/int4 builds at once, then the bench alone (main's kernels).
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OIV2_COMMIT=${OIV2_COMMIT:?}
R=out/e2e18; mkdir -p $R; nvidia-smi -L | tee $R/card.txt; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256 --cache-dir $R/cache)
for q in none int8 int4; do
  python3 -m oiv2compile bench llama-8b --quant $q --baselines '' --repeats 1 "${COMMON[@]}" --out $R/build-$q > $R/build-$q.log 2>&1 &
done
wait
echo "builds done at $SECONDS s"; tail -2 $R/build-*.log | cut -c1-200
timeout $((575 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant none,int8,int4 --baselines '' --repeats 3 "${COMMON[@]}" --out $R/llama-8b > $R/bench.log 2>&1
echo "bench rc=$? done at $SECONDS s"; tail -3 $R/bench.log
cp $R/llama-8b/*.md $OUT/ 2>/dev/null; cp $R/llama-8b/*.json $OUT/ 2>/dev/null
tar czf $OUT/e2e18.tar.gz --exclude=cache -C $R .
grep -E "^\|" $R/llama-8b/*.md | head -8
