#!/bin/bash
# Call 3: llama-8b end to end, batch 1: bf16, int8 and int4 as built by default (the quantized ones with the
# C++ attention), and int8 and int4 built with --no-prefetched-attention (Triton attention), in turn.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=${OIV2_COMMIT:-unknown}
R=$PWD/out/e2e; mkdir -p $R $OUT; nvidia-smi -L; date -u
for m in linear_int8_gemv linear_int4_mma linear_int8_gemm prefetched_decode_attention; do
  PYTHONPATH=$PWD timeout 200 python3 -c "from oiv2compile.kernels import $m; $m.load_extension()" &
done
wait; echo "libraries at $SECONDS s"
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256 --baselines '' --cache-dir $R/cache)
for q in none int8 int4; do
  PYTHONPATH=$PWD timeout 380 python3 -m oiv2compile bench llama-8b --quant $q --repeats 1 "${COMMON[@]}" --out $R/build-$q > $R/build-$q.log 2>&1 &
done
for q in int8 int4; do
  PYTHONPATH=$PWD timeout 380 python3 -m oiv2compile bench llama-8b --quant $q --repeats 1 --no-prefetched-attention "${COMMON[@]}" --out $R/build-$q-triton > $R/build-$q-triton.log 2>&1 &
done
wait; echo "builds done at $SECONDS s"; tail -n 3 $R/build-*.log > $OUT/call3-builds.log; grep -h -E "^\| inductor" $R/build-*/bench.md
run() { PYTHONPATH=$PWD timeout 100 python3 -m oiv2compile bench llama-8b --repeats 3 "${COMMON[@]}" "$@" > /dev/null 2>&1; echo "rc=$? at $SECONDS s"; }
run --quant none,int8,int4 --out $R/main-1; cp $R/main-1/bench.md $OUT/call3-main-1.md; grep -E "^\| inductor|copy" $R/main-1/bench.md
run --quant int8,int4 --no-prefetched-attention --out $R/triton-1; cp $R/triton-1/bench.md $OUT/call3-triton-1.md; grep -E "^\| inductor" $R/triton-1/bench.md
[ $SECONDS -lt 470 ] && { run --quant none,int8,int4 --out $R/main-2; cp $R/main-2/bench.md $OUT/call3-main-2.md; grep -E "^\| inductor" $R/main-2/bench.md; }
[ $SECONDS -lt 520 ] && { run --quant int8,int4 --no-prefetched-attention --out $R/triton-2; cp $R/triton-2/bench.md $OUT/call3-triton-2.md; grep -E "^\| inductor" $R/triton-2/bench.md; }
echo "end at $SECONDS s"
