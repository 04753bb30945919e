#!/bin/bash
# Session 23, call 1 (one H200): oiv2::decode_attention (the cluster kernel) against the Triton paths by
# bench_attention.py, with its CUDA tests and the int4 tests (one chain of int sums, 6c65cb2) in the background.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L; date -u
(timeout 420 python3 -m pytest -q -m cuda tests/kernels/test_decode_attention.py -p no:cacheprovider > $OUT/pytest-attention.txt 2>&1; echo rc=$? >> $OUT/pytest-attention.txt
 timeout 300 python3 -m pytest -q -m cuda tests/kernels/test_linear_int4_epilogues.py tests/kernels/test_linear_quant.py -k "int4 or gated" -p no:cacheprovider > $OUT/pytest-int4.txt 2>&1; echo rc=$? >> $OUT/pytest-int4.txt) &
timeout 400 python3 benchmarks/bench_attention.py --batch 1,8 --cache-lens 256,1024 --filled 1,64,128,192,256,512,1000 --repeats 50 > $OUT/attention.md 2> $OUT/attention.err
echo bench rc=$? at $SECONDS s; tail -3 $OUT/attention.err
wait
tail -15 $OUT/pytest-attention.txt; grep -E "^FAILED|passed|failed|rc=" $OUT/pytest-int4.txt | tail -8
cat $OUT/attention.md
