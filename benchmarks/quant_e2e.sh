#!/usr/bin/env bash
# Batch-1 decode of bf16, int8 and int4 artifacts of one model, measured in one run (one process,
# one card, with HF static-cache generate beside them), then the linear chain of the same model
# (bench_linear_chain.py: bf16, int8 and int4 linears with the kernels between them, no build).
# An 8B build takes 3-6 minutes and holds about 37 GB of GPU memory while it runs. With three GPUs or
# more the three artifacts build in parallel, one per GPU, into a shared bench cache; with fewer, one
# bench command builds them in turn (each in a process of its own). The measuring run then reuses them
# (the cache is keyed by the build config, not the GPU index), alone on the card.
#   MODEL=llama-8b OUT=out/quant-e2e bash benchmarks/quant_e2e.sh
set -euo pipefail
MODEL=${MODEL:-llama-8b}
OUT=${OUT:-out/quant-e2e}
CACHE=${CACHE:-$OUT/cache}
GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --cache-dir "$CACHE")
mkdir -p "$OUT"
if [ "$GPUS" -ge 3 ]; then
  i=0
  pids=()
  for quant in none int8 int4; do
    CUDA_VISIBLE_DEVICES=$i python3 -m oiv2compile bench "$MODEL" --quant "$quant" --baselines '' \
      --repeats 1 "${COMMON[@]}" --out "$OUT/build-$quant" >"$OUT/build-$quant.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
else
  CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant none,int8,int4 --baselines '' \
    --repeats 1 "${COMMON[@]}" --out "$OUT/build" >"$OUT/build.log" 2>&1
fi
CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant none,int8,int4 --baselines hf-static \
  --repeats 3 "${COMMON[@]}" --out "$OUT/$MODEL"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_linear_chain.py --model "$MODEL" | tee "$OUT/linear-chain.md"
