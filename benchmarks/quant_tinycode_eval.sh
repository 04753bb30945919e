#!/usr/bin/env bash
# Held-out perplexity of tinycode in bf16, int8 and int4 (groups 32, 64, 128) on a GPU: each artifact
# is built, then scored on tinycode's held-out files against the fp32 reference (`oiv2compile eval`),
# one after another on the same card (five Inductor builds at once on a 16-core machine each took
# more than 170 s and none finished). JSON per artifact in $OUT.
#   OUT=out/quant-eval bash benchmarks/quant_tinycode_eval.sh
set -euo pipefail
OUT=${OUT:-out/quant-eval}
mkdir -p "$OUT"
specs=(
  "bf16:"
  "int8:--quant int8"
  "int4-g32:--quant int4 --quant-group-size 32"
  "int4-g64:--quant int4 --quant-group-size 64"
  "int4-g128:--quant int4 --quant-group-size 128"
)
for spec in "${specs[@]}"; do
  name=${spec%%:*}
  # shellcheck disable=SC2086  # the flags are meant to split
  python3 -m oiv2compile build tinycode -o "$OUT/$name" --device cuda --dtype bfloat16 --force ${spec#*:} \
    >"$OUT/build-$name.log" 2>&1
  python3 -m oiv2compile eval "$OUT/$name" --json "$OUT/eval-tinycode-$name-cuda.json" 2>&1 | tail -4
done
