#!/bin/bash
# Call 2: where the C++ decode attention's time goes in the int4 chain (timing-only variants, wrong outputs
# by design), and the chain at a cache of 128 positions (96 filled), where its shared memory (105 KB) fits
# beside a q/k/v CTA, against the Triton attention.
#   late: the cache copies issued after the wait for the q/k/v product (no overlap)
#   nocompute: no scores or weighted sum (the tiles loop skipped)
#   nocopy: no cache copies (the tiles computed on whatever shared memory holds)
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
mkdir -p $OUT; nvidia-smi -L; date -u
F=oiv2compile/kernels/csrc/prefetched_decode_attention.cu
for v in late nocompute nocopy; do rm -rf /tmp/$v; mkdir -p /tmp/$v; cp -r oiv2compile benchmarks /tmp/$v/; done
python3 - <<'PY'
import re
def edit(tree, subs):
    p = f"/tmp/{tree}/oiv2compile/kernels/csrc/prefetched_decode_attention.cu"
    s = open(p).read()
    for a, b in subs:
        assert a in s, (tree, a)
        s = s.replace(a, b)
    open(p, "w").write(s)
edit("late", [("  wait_for_previous_grid();  // the new token's row", "  // moved: the new token's row"),
              ("  allow_dependents_to_launch();  // the o product", "  wait_for_previous_grid();\n  allow_dependents_to_launch();  // the o product")])
edit("nocompute", [("for (int tile = warp; tile < tiles; tile += kWarps)", "for (int tile = warp; tile < 0; tile += kWarps)")])
edit("nocopy", [("    copy_row(ks + r * kRow", "    if (r < 0) copy_row(ks + r * kRow"), ("    copy_row(vs + r * kRow", "    if (r < 0) copy_row(vs + r * kRow"),
                ("barrier_expect_bytes(&bars[0], filled * D * 2)", "barrier_expect_bytes(&bars[0], 0)"),
                ("barrier_expect_bytes(&bars[1], filled * D * 2)", "barrier_expect_bytes(&bars[1], 0)")])
PY
for tree in $PWD /tmp/late /tmp/nocompute /tmp/nocopy; do for m in prefetched_decode_attention linear_int4_mma; do
  (cd $tree && PYTHONPATH=$tree timeout 240 python3 -c "from oiv2compile.kernels import $m; $m.load_extension()" > /dev/null 2>&1) &
done; done
wait; echo "libraries at $SECONDS s"
for i in 1 2; do for tree in $PWD /tmp/late /tmp/nocompute /tmp/nocopy; do
  (cd $tree && PYTHONPATH=$tree timeout 120 python3 benchmarks/bench_linear_chain.py --quant int4-norm-act,bf16 \
     --attention prefetched --label "$(basename $tree) $i" --replays 20 --repeats 5 2>&1 | grep -E "^\| |bandwidth")
done; done > $OUT/call2-variants.md
cat $OUT/call2-variants.md
PYTHONPATH=$PWD timeout 200 python3 benchmarks/bench_linear_chain.py --quant int4-norm-act,int8-norm-act+tiles,bf16 \
  --attention none,triton,prefetched --cache-len 128 --filled 96 --replays 20 --repeats 5 > $OUT/call2-chain128.md 2>&1
echo "chain128 rc=$? at $SECONDS s"; cat $OUT/call2-chain128.md | grep -E "^\| |bandwidth"
