"""What folding the RMSNorm weights into the linears before quantization does to accuracy.

CUDA builds with the norm inside the decode products (fold_norm_weights, on by default for int8 and
int4) quantize W * diag(g) instead of W, in every program, so the held-out perplexity that `eval`
measures changes with it. This builds the bundled tinycode on the CPU in fp32 twice per group size,
with the fold forced on (the CPU pipeline otherwise skips it: no fused kernel runs there) and without,
and scores both on the same held-out windows.

    python benchmarks/eval_norm_fold.py --quant int4 --groups 64,128 --max-windows 100 --out /tmp/fold
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import oiv2compile.passes.fold_norm_weights as fold_module
import oiv2compile.passes.registry as registry
from oiv2compile import api
from oiv2compile.accuracy import evaluate
from oiv2compile.config import BuildConfig, Quantization


def fold_anywhere(cfg: BuildConfig) -> bool:
    """fold_norm_weights.applies without its CUDA and Inductor conditions."""
    return cfg.fusion.enable_norm_into_linear and cfg.quantization in (Quantization.INT8, Quantization.INT4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="int4", choices=("int8", "int4"))
    parser.add_argument("--groups", default="64,128", help="int4 group sizes")
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    groups = [int(g) for g in args.groups.split(",")] if args.quant == "int4" else [0]
    applies = fold_module.applies
    print("| weights | norm weights | perplexity | reference | difference |\n|---|---|---:|---:|---:|")
    for group in groups:
        for fold in (False, True):
            fold_module.applies = registry.fold_norm_applies = fold_anywhere if fold else applies
            cfg = BuildConfig().replace(quantization=args.quant, **({"quant": {"group_size": group}} if group else {}))
            name = f"{args.quant}{f'-g{group}' if group else ''}-{'folded' if fold else 'apart'}"
            start = time.time()
            artifact = api.build("tinycode", args.out / name, cfg, overwrite=True)
            report = evaluate(artifact, max_windows=args.max_windows)
            (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
            ppl = report["perplexity"]
            print(
                f"| {name.rsplit('-', 1)[0]} | {'folded into W' if fold else 'apart'} | {ppl['artifact']:.4f} "
                f"| {ppl['reference']:.4f} | {ppl['relative_difference']:+.3%} |  <!-- {time.time() - start:.0f} s -->",
                flush=True,
            )
    fold_module.applies = registry.fold_norm_applies = applies
    return 0


if __name__ == "__main__":
    sys.exit(main())
