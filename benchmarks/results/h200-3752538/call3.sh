#!/bin/bash
# Session 23, call 3 (one H200): llama-8b end to end at f044de0 (one chain of int sums a group in the int4
# planes products), bf16, int8 and int4 built at once, measured in one bench process, then profile_decode
# of the three artifacts if the call's time allows.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=f044de0
R=$PWD/out/e2e23; mkdir -p $R; nvidia-smi -L | tee $R/card.txt; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
for q in none int8 int4; do
  PYTHONPATH=$PWD python3 -m oiv2compile bench llama-8b --quant $q --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-$q > $R/build-$q.log 2>&1 &
done
wait
echo "builds done at $SECONDS s"; for f in $R/build-*.log; do tail -n 2 $f | cut -c1-200; done
PYTHONPATH=$PWD timeout $((560 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant none,int8,int4 --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b > $R/bench.log 2>&1
echo "bench rc=$? done at $SECONDS s"; tail -3 $R/bench.log
mkdir -p $OUT/new; cp $R/llama-8b/*.md $R/llama-8b/*.json $OUT/new/ 2>/dev/null
tar czf $OUT/e2e23.tar.gz --exclude=cache -C $R .
grep -E "^\|" $R/llama-8b/*.md | head -8
if [ $SECONDS -lt 470 ]; then
  PYTHONPATH=$PWD timeout $((585 - SECONDS)) python3 benchmarks/profile_decode.py $R/cache/*/ --out $OUT/profile.json > $OUT/profile.log 2>&1
  echo "profile rc=$? at $SECONDS s"; cat $OUT/profile.md 2>/dev/null | head -70
fi
