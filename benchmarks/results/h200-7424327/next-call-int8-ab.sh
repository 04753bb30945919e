#!/bin/bash
# Prepared in the thirty-fourth session, not run (no device time was left): the CUDA tests of the C++ attention as
# they stand after the review (inputs shared with the Triton op's tests), then llama-8b int8 with and without the
# C++ attention at batch 1 and 8 (call 3's five builds at once ran out of GPU memory: three at most here), which
# also gives the batch-8 TTFT after the thirty-third session's slice fix. About 8 minutes.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 OIV2_COMMIT=${OIV2_COMMIT:-unknown}
R=$PWD/out/e2e8; mkdir -p $R $OUT; nvidia-smi -L; date -u
for m in linear_int8_gemv linear_int4_mma linear_int8_gemm prefetched_decode_attention; do
  PYTHONPATH=$PWD timeout 200 python3 -c "from oiv2compile.kernels import $m; $m.load_extension()" &
done
wait; echo "libraries at $SECONDS s"
PYTHONPATH=$PWD timeout 120 python3 -m pytest -m cuda -q tests/kernels/test_prefetched_decode_attention.py > $OUT/pytest.txt 2>&1
echo "pytest rc=$? at $SECONDS s"; tail -n 3 $OUT/pytest.txt
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1,8 --prompt-len 128 --new-tokens 128 --max-seq-len 256 --baselines '' --cache-dir $R/cache)
PYTHONPATH=$PWD timeout 330 python3 -m oiv2compile bench llama-8b --quant none --repeats 1 "${COMMON[@]}" --out $R/b-none > $R/b-none.log 2>&1 &
PYTHONPATH=$PWD timeout 330 python3 -m oiv2compile bench llama-8b --quant int8 --repeats 1 "${COMMON[@]}" --out $R/b-int8 > $R/b-int8.log 2>&1 &
PYTHONPATH=$PWD timeout 330 python3 -m oiv2compile bench llama-8b --quant int8 --repeats 1 --no-prefetched-attention "${COMMON[@]}" --out $R/b-int8t > $R/b-int8t.log 2>&1 &
wait; echo "builds done at $SECONDS s"; tail -n 2 $R/b-*.log > $OUT/builds.log
run() { PYTHONPATH=$PWD timeout 90 python3 -m oiv2compile bench llama-8b --repeats 3 "${COMMON[@]}" "$@" > /dev/null 2>&1; echo "rc=$? at $SECONDS s"; }
run --quant none,int8 --out $R/main; cp $R/main/bench.md $OUT/main.md; grep -E "^\| inductor|copy" $R/main/bench.md
run --quant int8 --no-prefetched-attention --out $R/triton; cp $R/triton/bench.md $OUT/triton.md; grep -E "^\| inductor" $R/triton/bench.md
