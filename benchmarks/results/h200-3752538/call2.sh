#!/bin/bash
# Session 23, call 2 (one H200): where the cluster kernel's time goes (call2-variants.patch.txt, chosen by
# OIV2_DA_VARIANT: 0 as landed, 1 without programmatic launch, 2 clusters but no combine (timing only),
# 3 no clusters and no combine (timing only)), and the Triton single pass at other block sizes.
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
D=benchmarks/results/h200-3752538
ROOT=$PWD; T=$(mktemp -d); cp -r oiv2compile benchmarks pyproject.toml $T/ && (cd $T && git apply $ROOT/$D/call2-variants.patch.txt) || exit 1
nvidia-smi -L; date -u
(cd $T && PYTHONPATH=$T python3 -c "from oiv2compile.kernels import decode_attention as d; d.load_extension()") > $OUT/build.txt 2>&1 &
PYTHONPATH=$PWD timeout 200 python3 $D/call2-triton-sweep.py.txt > $OUT/triton-sweep.txt 2>&1
wait
for v in 0 1 2 3; do
  (cd $T && OIV2_DA_VARIANT=$v PYTHONPATH=$T timeout 100 python3 benchmarks/bench_attention.py --batch 1,8 --cache-lens 256 --filled 1,128,256 --repeats 30 > $OUT/variant$v.md 2> $OUT/variant$v.err)
  echo "## variant $v"; grep "^| [18] " $OUT/variant$v.md
done
cat $OUT/build.txt | tail -3
cat $OUT/triton-sweep.txt
