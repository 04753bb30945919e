#!/bin/bash
# Call 1 (thirty-fourth session): the C++ decode attention's CUDA tests, then the 32-layer chains with
# the Triton attention, the C++ one, or none (a copy standing in) between each qkv and o product.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p $OUT; nvidia-smi -L; date -u
for m in prefetched_decode_attention linear_int8_gemv linear_int4_mma; do
  timeout 240 python3 -c "from oiv2compile.kernels import $m; $m.load_extension()" > $OUT/lib-$m.log 2>&1 &
done
wait; echo "libraries at $SECONDS s"; tail -n 3 $OUT/lib-*.log
timeout 240 python3 -m pytest -m cuda -q tests/kernels/test_prefetched_decode_attention.py > $OUT/call1-pytest.txt 2>&1
echo "pytest rc=$? at $SECONDS s"; tail -n 15 $OUT/call1-pytest.txt
timeout $((560 - SECONDS)) python3 benchmarks/bench_linear_chain.py --quant int4-norm-act,int8-norm-act+tiles,bf16 \
  --attention none,triton,prefetched --replays 20 --repeats 5 > $OUT/call1-chain.md 2> $OUT/call1-chain.err
echo "chain rc=$? at $SECONDS s"; cat $OUT/call1-chain.md; tail -n 5 $OUT/call1-chain.err
