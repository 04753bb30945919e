#!/bin/bash
# Call 4 (same machine as call 3, whose five builds at once ran out of GPU memory but for bf16 and int8 with
# the Triton attention): int4 built with and without the C++ attention, then bf16 (cached) and int4 in one
# process, int4 with the Triton attention in the next.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=${OIV2_COMMIT:-unknown}
R=$PWD/out/e2e; mkdir -p $R $OUT; date -u
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256 --baselines '' --cache-dir $R/cache)
PYTHONPATH=$PWD timeout 250 python3 -m oiv2compile bench llama-8b --quant int4 --repeats 1 "${COMMON[@]}" --out $R/b4 > $R/b4.log 2>&1 &
PYTHONPATH=$PWD timeout 250 python3 -m oiv2compile bench llama-8b --quant int4 --repeats 1 --no-prefetched-attention "${COMMON[@]}" --out $R/b4t > $R/b4t.log 2>&1 &
wait; echo "builds done at $SECONDS s"; grep -h -E "^\| inductor" $R/b4/bench.md $R/b4t/bench.md; tail -n 2 $R/b4.log $R/b4t.log
PYTHONPATH=$PWD timeout 60 python3 -m oiv2compile bench llama-8b --repeats 2 "${COMMON[@]}" --quant none,int4 --out $R/m1 > /dev/null 2>&1
echo "rc=$? at $SECONDS s"; cp $R/m1/bench.md $OUT/call4-main.md; grep -E "^\| inductor|copy" $R/m1/bench.md
PYTHONPATH=$PWD timeout 45 python3 -m oiv2compile bench llama-8b --repeats 2 "${COMMON[@]}" --quant int4 --no-prefetched-attention --out $R/t1 > /dev/null 2>&1
echo "rc=$? at $SECONDS s"; cp $R/t1/bench.md $OUT/call4-triton.md; grep -E "^\| inductor" $R/t1/bench.md
