#!/bin/bash
# Session 22, call 2 (one H200): llama-8b end to end, bf16 and int4 of the working tree (one row of x as int8
# planes) and int4 of main (6ca57b8, scratch_gpu/base), built at once, then measured in turn; the new planes
# tests and the one-row tests meanwhile.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=66f5900
R=$PWD/out/e2e22; mkdir -p $R; nvidia-smi -L | tee $R/card.txt; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256)
(PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py -k "planes or one_row or gated_cuda" -p no:cacheprovider > $OUT/pytest-int4.txt 2>&1; echo pytest rc=$? >> $OUT/pytest-int4.txt) &
for q in none int4; do
  PYTHONPATH=$PWD python3 -m oiv2compile bench llama-8b --quant $q --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache --out $R/build-$q > $R/build-$q.log 2>&1 &
done
(cd scratch_gpu/base && OIV2_COMMIT=6ca57b8 PYTHONPATH=. python3 -m oiv2compile bench llama-8b --quant int4 --baselines '' --repeats 1 "${COMMON[@]}" --cache-dir $R/cache-base --out $R/build-base > $R/build-base.log 2>&1) &
wait
echo "builds done at $SECONDS s"; tail -2 $R/build-*.log | cut -c1-200
PYTHONPATH=$PWD timeout $((440 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant none,int4 --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache --out $R/llama-8b > $R/bench.log 2>&1
echo "bench rc=$? done at $SECONDS s"; tail -3 $R/bench.log
(cd scratch_gpu/base && OIV2_COMMIT=6ca57b8 PYTHONPATH=. timeout $((560 - SECONDS)) python3 -m oiv2compile bench llama-8b --quant int4 --baselines '' --repeats 3 "${COMMON[@]}" --cache-dir $R/cache-base --out $R/llama-8b-base > $R/bench-base.log 2>&1)
echo "bench-base rc=$? done at $SECONDS s"; tail -3 $R/bench-base.log
mkdir -p $OUT/new $OUT/base; cp $R/llama-8b/*.md $R/llama-8b/*.json $OUT/new/ 2>/dev/null; cp $R/llama-8b-base/*.md $R/llama-8b-base/*.json $OUT/base/ 2>/dev/null
tar czf $OUT/e2e22.tar.gz --exclude=cache --exclude=cache-base -C $R .
grep -E "passed|failed" $OUT/pytest-int4.txt | tail -3
grep -E "^\|" $R/llama-8b/*.md | head -8; grep -E "^\|" $R/llama-8b-base/*.md | head -5
