#!/usr/bin/env bash
# Batch-1 decode of bf16, int8 and int4 artifacts of one model, measured in one run (one process,
# one card, with HF static-cache generate beside them). An 8B build takes 3-6 minutes, so the three
# artifacts first build in parallel, one per GPU where there are several, into a shared bench cache;
# the measuring run then reuses them (the cache is keyed by the build config, not the GPU index).
# On one GPU the three builds share it: an 8B model needs an H200 (or run them one at a time).
#   MODEL=llama-8b OUT=out/quant-e2e bash benchmarks/quant_e2e.sh
set -euo pipefail
MODEL=${MODEL:-llama-8b}
OUT=${OUT:-out/quant-e2e}
CACHE=${CACHE:-$OUT/cache}
GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --cache-dir "$CACHE")
mkdir -p "$OUT"
i=0
pids=()
for quant in none int8 int4; do
  CUDA_VISIBLE_DEVICES=$((i % GPUS)) python3 -m oiv2compile bench "$MODEL" --quant "$quant" --baselines '' \
    --repeats 1 "${COMMON[@]}" --out "$OUT/build-$quant" >"$OUT/build-$quant.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for pid in "${pids[@]}"; do wait "$pid"; done
CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant none,int8,int4 --baselines hf-static \
  --repeats 3 "${COMMON[@]}" --out "$OUT/$MODEL"
