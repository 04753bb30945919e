"""Reruns the setup of the rows in RESULTS.md through `oiv2compile bench`, which does all the measuring.

The setup: one preset (random weights from the public config), bfloat16, batch 1, a prompt of 128
random tokens, 128 greedy new tokens, the inductor backend with max_seq_len 2048, HF eager and HF
generate(cache_implementation="static") in the same run, median of 3 runs after one warm-up. Any
further `oiv2compile bench` option given here replaces the setup's (e.g. --batch-sizes 1,8).

    OIV2_COMMIT=$(git rev-parse --short HEAD) python benchmarks/bench_generate.py --model llama-8b

writes benchmarks/results/MODEL/bench.json and the plots, and prints the table.
"""

from __future__ import annotations

import argparse
import sys

from oiv2compile.cli import main as oiv2compile_main

SETUP = [
    "--backends", "inductor",
    "--baselines", "hf-eager,hf-static",
    "--dtype", "bfloat16",
    "--batch-sizes", "1",
    "--prompt-len", "128",
    "--new-tokens", "128",
    "--max-seq-len", "2048",
    "--warmup", "1",
    "--repeats", "3",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="a preset or a Hugging Face model directory")
    args, options = parser.parse_known_args()
    out = ["--out", f"benchmarks/results/{args.model}"]
    # Later options win in argparse, so those given here replace the setup's.
    return oiv2compile_main(["bench", args.model, *SETUP, *out, *options])


if __name__ == "__main__":
    sys.exit(main())
