#!/bin/bash
# Prepared in the thirty-fourth session, not run: the C++ attention for caches of any length (wip-split.patch.txt:
# CTAs of 256 positions each, those past the filled length returning at once, the last to arrive combining the
# parts through global memory with a counter it sets back to zero), so that builds with the default
# max_seq_len (2048) take it too. Its CUDA tests in a patched copy of the tree, then the int4 and int8 chains with
# caches of 2048 positions (192 and 1500 filled) against the Triton split path. About 5 minutes.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
D=benchmarks/results/h200-7424327; mkdir -p $OUT; nvidia-smi -L; date -u
rm -rf /tmp/split && mkdir -p /tmp/split && git archive HEAD 2>/dev/null | tar -x -C /tmp/split || cp -r . /tmp/split
(cd /tmp/split && git apply $OLDPWD/$D/wip-split.patch.txt 2>/dev/null || patch -p1 < $OLDPWD/$D/wip-split.patch.txt) > /dev/null
cd /tmp/split
for m in prefetched_decode_attention linear_int8_gemv linear_int4_mma; do
  PYTHONPATH=$PWD timeout 200 python3 -c "from oiv2compile.kernels import $m; $m.load_extension()" &
done
wait; echo "libraries at $SECONDS s"
PYTHONPATH=$PWD timeout 150 python3 -m pytest -m cuda -q tests/kernels/test_prefetched_decode_attention.py > $OUT/split-pytest.txt 2>&1
echo "pytest rc=$? at $SECONDS s"; tail -n 15 $OUT/split-pytest.txt
for filled in 192 1500; do
  PYTHONPATH=$PWD timeout 120 python3 benchmarks/bench_linear_chain.py --quant int4-norm-act,int8-norm-act+tiles \
    --attention triton,prefetched --cache-len 2048 --filled $filled --replays 20 --repeats 5 2>&1 | grep -E "^\| |bandwidth"
done > $OUT/split-chain.md; cat $OUT/split-chain.md
