#!/usr/bin/env bash
# Batch-1 decode of bf16, int8 and int4 artifacts of one model, measured in one run (one process, one
# card), then the linear chain of the same model (bench_linear_chain.py, no build) and a per-kernel
# profile of each artifact (profile_decode.py). Results go to $RESULTS (bench tables and JSON, logs).
#   MODEL=llama-8b RESULTS=out/quant-e2e bash benchmarks/quant_e2e.sh
# Options (environment):
#   TESTS=1          run `pytest -m cuda $TEST_PATHS` (default: tests/kernels tests/runtime) on the
#                    last card while the artifacts build (about 12 minutes on an H100 for the default);
#                    on fewer than four cards the measuring waits for them, on four or more it runs on
#                    card 0 beside them;
#   NORM_APART=1     also build and measure $NORM_APART_QUANT (int8 or int4; default int4) with
#                    --no-fuse-norm-into-linear (its own bench run, with its own bf16 row from the same
#                    cache entry), and the unfused rows in the chain;
#   ROPE_APART=1     instead, build and measure $ROPE_APART_QUANT (default int8) with
#                    --no-fuse-rope-into-attention (its own bench run: bf16 would need a build of its own);
#   BASELINES=...    the bench's --baselines for the measuring run (default: none);
#   ARCHIVE=path     tar.gz of $RESULTS, rewritten after each phase (for a machine that may go away);
#   DONE=path        touched when the measuring runs have finished (before the profile);
#   PARALLEL_BUILDS=1 build the three artifacts at once even on fewer than three cards (build i on
#                    card i mod $GPUS): three 8B builds hold about 111 GB, which one H200 has.
# An 8B build takes 3-6 minutes and holds about 37 GB of GPU memory while it runs. With three GPUs or
# more the three artifacts build in parallel, one per GPU, into a shared bench cache; with fewer, one
# bench command builds them in turn; with four, the build of NORM_APART or ROPE_APART takes the fourth (each in
# a process of its own). The measuring run then reuses them
# (the cache is keyed by the build config, not the GPU index), alone on the card.
# On a lent machine whose calls are shorter than this script, start it in a session of its own
# (`setsid nohup bash benchmarks/quant_e2e.sh > log 2>&1 < /dev/null &`) and poll for $DONE.
set -uo pipefail
MODEL=${MODEL:-llama-8b}
RESULTS=${RESULTS:-out/quant-e2e}
CACHE=${CACHE:-$RESULTS/cache}
GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
# The fourth build (NORM_APART or ROPE_APART): its quantization, its flag, and what its bench run measures.
FOURTH=0
if [ "${ROPE_APART:-0}" = 1 ]; then
  FOURTH=1
  APART=${ROPE_APART_QUANT:-int8}
  APART_FLAG=--no-fuse-rope-into-attention
  APART_MEASURED=$APART
elif [ "${NORM_APART:-0}" = 1 ]; then
  FOURTH=1
  APART=${NORM_APART_QUANT:-int4}
  APART_FLAG=--no-fuse-norm-into-linear
  APART_MEASURED="none,$APART"  # the bf16 row reuses its cache entry: the flag leaves bf16 builds alone
fi
TEST_PATHS=${TEST_PATHS:-tests/kernels tests/runtime}
COMMON=(--backends inductor --dtype bfloat16 --batch-sizes 1 --prompt-len 128 --new-tokens 128 --max-seq-len 256
  --cache-dir "$CACHE")
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

archive() { if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" --exclude=cache -C "$RESULTS" .; fi; }
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$RESULTS/phases.txt"; }

nvidia-smi -L > "$RESULTS/card.txt"
stamp start
# The tests run on the last card; with four or more the measuring card (0) is not theirs, so the
# measuring runs need not wait for them.
TEST_GPU=$((GPUS - 1))
if [ "${TESTS:-0}" = 1 ]; then
  # shellcheck disable=SC2086  # TEST_PATHS is a list of paths
  (CUDA_VISIBLE_DEVICES=$TEST_GPU python3 -m pytest -q -m cuda $TEST_PATHS -p no:cacheprovider \
    > "$RESULTS/cuda-tests.log" 2>&1; stamp "cuda tests rc=$?") &
  tests=$!
fi
if [ "$GPUS" -ge 3 ] || [ "${PARALLEL_BUILDS:-0}" = 1 ]; then
  i=0
  pids=()
  for quant in none int8 int4; do
    CUDA_VISIBLE_DEVICES=$((i % GPUS)) python3 -m oiv2compile bench "$MODEL" --quant "$quant" --baselines '' \
      --repeats 1 "${COMMON[@]}" --out "$RESULTS/build-$quant" >"$RESULTS/build-$quant.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  if [ "$FOURTH" = 1 ] && [ "$GPUS" -ge 4 ]; then
    CUDA_VISIBLE_DEVICES=3 python3 -m oiv2compile bench "$MODEL" --quant "$APART" "$APART_FLAG" \
      --baselines '' --repeats 1 "${COMMON[@]}" --out "$RESULTS/build-apart" >"$RESULTS/build-apart.log" 2>&1 &
    pids+=($!)
  fi
  for pid in "${pids[@]}"; do wait "$pid"; done
else
  CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant none,int8,int4 --baselines '' \
    --repeats 1 "${COMMON[@]}" --out "$RESULTS/build" >"$RESULTS/build.log" 2>&1
fi
if [ "$FOURTH" = 1 ] && [ "$GPUS" -lt 4 ]; then
  CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant "$APART" "$APART_FLAG" --baselines '' \
    --repeats 1 "${COMMON[@]}" --out "$RESULTS/build-apart" >"$RESULTS/build-apart.log" 2>&1
fi
stamp builds done
archive
if [ -n "${tests:-}" ] && [ "$TEST_GPU" = 0 ]; then wait "$tests"; archive; fi
CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant none,int8,int4 --baselines "${BASELINES:-}" \
  --repeats 3 "${COMMON[@]}" --out "$RESULTS/$MODEL" >"$RESULTS/bench.log" 2>&1
stamp measured
if [ "$FOURTH" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 python3 -m oiv2compile bench "$MODEL" --quant "$APART_MEASURED" "$APART_FLAG" \
    --baselines '' --repeats 3 "${COMMON[@]}" --out "$RESULTS/$MODEL-apart" >"$RESULTS/bench-apart.log" 2>&1
  stamp "measured $APART $APART_FLAG"
fi
CHAIN_QUANTS=bf16,int8-norm-act,int4-norm,int4-norm-act  # the forms the artifacts run (int4-norm: before the gated form)
if [ "$FOURTH" = 1 ] && [ "$APART_FLAG" = --no-fuse-norm-into-linear ]; then
  CHAIN_QUANTS=bf16,int8,int8-norm,int8-norm-act,int4,int4-norm,int8,int8-norm,int8-norm-act,int4,int4-norm
fi
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python3 benchmarks/bench_linear_chain.py --model "$MODEL" --quant "$CHAIN_QUANTS" \
  > "$RESULTS/linear-chain.md" 2>&1
stamp chain done
if [ -n "${tests:-}" ]; then wait "$tests"; fi
archive
if [ -n "${DONE:-}" ]; then touch "$DONE"; fi
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python3 benchmarks/profile_decode.py "$CACHE"/*/ --out "$RESULTS/profile.json" \
  > "$RESULTS/profile.log" 2>&1
stamp profiled
archive
