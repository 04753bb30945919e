"""The command line: parses arguments into a BuildConfig or a generation request and calls the API.

    oiv2compile build MODEL -o OUT [--backend inductor|eager|onnx] [--dtype ...] [--max-batch-size N] ...
    oiv2compile run OUT --prompt TEXT | --token-ids 1,2,3 [--max-new-tokens N] [--temperature T] ...
    oiv2compile inspect OUT [--json]
    oiv2compile eval OUT [--data PATH] [--reference DIR] [--window N] [--max-windows N] [--json FILE]
    oiv2compile bench MODEL [--backends ...] [--baselines ...] [--quant ...] [--batch-sizes 1,8,32] [--out DIR] ...
    oiv2compile serve OUT [--host 127.0.0.1] [--port 8000] [--max-queue N]   (needs the `serve` extra)

User errors print one sentence on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from oiv2compile.errors import Oiv2Error

    try:
        return int(args.func(args) or 0)
    except Oiv2Error as exc:
        print(f"oiv2compile: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("oiv2compile: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oiv2compile", description="Compile Hugging Face causal LMs and run them.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="compile a model directory or preset into an artifact")
    build.add_argument(
        "model", help="a local Hugging Face model directory, or a preset name (`oiv2compile presets` lists them)"
    )
    build.add_argument("-o", "--out", required=True, type=Path, help="the artifact directory to write")
    build.add_argument("--backend", choices=["inductor", "eager", "onnx"], help="lowering backend (default: inductor)")
    build.add_argument("--device", choices=["auto", "cpu", "cuda"], help="build for this device (default: auto)")
    build.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights and activations")
    build.add_argument("--max-batch-size", type=int, help="most sequences decoded together (default: 8)")
    build.add_argument("--max-seq-len", type=int, help="cache length per sequence (default: min(2048, model limit))")
    build.add_argument("--seed", type=int, help="seed of a preset's random weights")
    build.add_argument("--quant", choices=["none", "int8", "int4"], help="weight-only quantization (default: none)")
    build.add_argument("--quant-group-size", type=int, choices=[32, 64, 128], help="int4 group size (default: 128)")
    build.add_argument("--no-quantize-head", action="store_true", help="keep the output head in full precision")
    build.add_argument(
        "--no-quantize-embedding", action="store_true", help="keep the token-embedding table in full precision"
    )
    build.add_argument(
        "--no-cuda-kernels",
        action="store_true",
        help="keep quantized linears on the Triton kernels, not the CUDA C++ ops (int4 tensor-core op, int8 GEMV)",
    )
    build.add_argument(
        "--no-int8-tiles",
        action="store_true",
        help="keep int8 weights row-major (int8-rowmajor-v1), not in the tiles of the one-row CUDA kernel",
    )
    build.add_argument(
        "--no-prefetched-attention",
        action="store_true",
        help="CUDA: keep the decode attention on the Triton kernel, not the C++ kernel that copies the cache early",
    )
    build.add_argument("--no-verify", action="store_true", help="skip the comparison with Hugging Face's forward")
    build.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs")
    build.add_argument("--no-fuse-qkv", action="store_true", help="keep the q, k and v projections apart")
    build.add_argument("--no-fuse-ffn", action="store_true", help="keep the MLP's gate and up projections apart")
    build.add_argument("--no-fuse-norms", action="store_true", help="keep residual adds and RMSNorms apart")
    build.add_argument(
        "--no-fuse-rope-kv-write",
        action="store_true",
        help="keep the rotary embedding of q and k apart from the cache writes",
    )
    build.add_argument(
        "--no-fuse-rope-into-attention",
        action="store_true",
        help="CUDA: keep the decode programs' rotary embedding and cache writes apart from the attention kernel",
    )
    build.add_argument(
        "--no-fuse-norm-into-linear",
        action="store_true",
        help="int8 and int4 on CUDA: keep each residual add and RMSNorm apart from the decode products around it",
    )
    build.add_argument(
        "--no-fuse-gated-act-into-linear",
        action="store_true",
        help="int8 and int4 on CUDA: keep the gated activation apart from the gate/up decode product",
    )
    build.add_argument("--force", action="store_true", help="replace OUT if it exists")
    build.set_defaults(func=_build)

    run = sub.add_parser("run", help="generate from an artifact")
    run.add_argument("artifact", type=Path)
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs an artifact with a tokenizer)")
    prompt.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    run.add_argument("--top-k", type=int)
    run.add_argument("--top-p", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="run on this device (default: the one it was built for)")
    run.add_argument("--stream", action="store_true", help="print tokens as they come")
    run.add_argument("--echo", action="store_true", help="print the prompt text before the completion")
    run.set_defaults(func=_run)

    inspect = sub.add_parser("inspect", help="show an artifact's manifest, pass report and file sizes")
    inspect.add_argument("artifact", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.set_defaults(func=_inspect)

    evaluate = sub.add_parser(
        "eval", help="perplexity and next-token agreement of an artifact against its Hugging Face model in fp32"
    )
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument(
        "--data",
        type=Path,
        help="a directory of .py files, a text file or a .jsonl.xz archive (default: tinycode's held-out files)",
    )
    evaluate.add_argument("--reference", type=Path, help="the HF model directory to compare with (default: the source)")
    evaluate.add_argument("--window", type=int, help="tokens per scored window (default: min(1024, max_seq_len + 1))")
    evaluate.add_argument("--max-windows", type=int, help="score only the first N windows")
    evaluate.add_argument("--device", help="run on this device (default: the one it was built for)")
    evaluate.add_argument("--json", help="write the full report as JSON to this file ('-' for stdout)")
    evaluate.set_defaults(func=_eval)

    bench = sub.add_parser(
        "bench", help="measure every backend and the Hugging Face baselines side by side: table, JSON and plots"
    )
    bench.add_argument("model", help="a preset, a local Hugging Face model directory, or a built artifact")
    bench.add_argument(
        "--backends", help="comma-separated, of inductor,eager,onnx,tensorrt (default: all; an artifact: its own)"
    )
    bench.add_argument("--baselines", help="comma-separated, of hf-eager,hf-static; '' for none (default: both)")
    bench.add_argument(
        "--quant", help="weight quantizations, comma-separated, of none,int8,int4 (default: none; an artifact: its own)"
    )
    bench.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights and activations")
    bench.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8,32 (default: 1)")
    bench.add_argument("--prompt-len", type=int, help="random prompt tokens per sequence (default: 128)")
    bench.add_argument("--new-tokens", type=int, help="greedy new tokens per sequence (default: 128)")
    bench.add_argument(
        "--max-seq-len", type=int, help="cache length of the built artifacts (default: prompt + new tokens, to 128)"
    )
    bench.add_argument("--warmup", type=int, help="unmeasured runs before each row (default: 1)")
    bench.add_argument("--repeats", type=int, help="measured runs per row (default: 5)")
    bench.add_argument("--seed", type=int, help="seed of the prompts and of a preset's random weights (default: 0)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench.json and the plots go")
    bench.add_argument(
        "--cache-dir", type=Path, help="built artifacts kept between runs (default: ~/.cache/oiv2compile/bench)"
    )
    bench.add_argument("--rebuild", action="store_true", help="build again even where the cache holds the artifact")
    bench.add_argument(
        "--no-fuse-norm-into-linear",
        action="store_true",
        help="build the int8 and int4 artifacts with --no-fuse-norm-into-linear (the others as they are)",
    )
    bench.add_argument(
        "--no-fuse-rope-into-attention",
        action="store_true",
        help="build every artifact with --no-fuse-rope-into-attention",
    )
    bench.add_argument("--no-int8-tiles", action="store_true", help="build int8 artifacts with --no-int8-tiles")
    bench.add_argument(
        "--no-prefetched-attention", action="store_true", help="build every artifact with --no-prefetched-attention"
    )
    bench.set_defaults(func=_bench)

    serve = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API (continuous batching)")
    serve.add_argument("artifact", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    serve.add_argument(
        "--max-queue", type=int, default=256, help="requests that may wait for a slot; past it, 429 (default: 256)"
    )
    serve.add_argument(
        "--prefill-token-budget",
        type=int,
        default=2048,
        help="most prompt tokens prefilled in one step (default: 2048)",
    )
    serve.add_argument("--model-name", help="the model id clients use (default: the artifact directory's name)")
    serve.add_argument("--device", help="run on this device (default: the one it was built for)")
    serve.set_defaults(func=_serve)

    presets = sub.add_parser("presets", help="list the bundled trained models and the random-weight presets")
    presets.set_defaults(func=_presets)
    return parser


def _build(args: argparse.Namespace) -> int:
    import oiv2compile
    from oiv2compile.config import FusionConfig

    overrides: dict[str, Any] = {}
    for name in ("backend", "device", "dtype", "max_batch_size", "max_seq_len", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.quant is not None:
        overrides["quantization"] = args.quant
    quant: dict[str, Any] = {}
    if args.quant_group_size is not None:
        quant["group_size"] = args.quant_group_size
    if args.no_quantize_head:
        quant["include_output_head"] = False
    if args.no_quantize_embedding:
        quant["include_embedding"] = False
    if args.no_cuda_kernels:
        quant["enable_cuda_kernels"] = False
    if args.no_int8_tiles:
        quant["int8_tiles"] = False
    if quant:
        overrides["quant"] = quant
    if args.no_prefetched_attention:
        overrides["attention"] = {"enable_prefetched_decode": False}
    if args.no_verify:
        overrides["enable_verification"] = False
    if args.no_cuda_graphs:
        overrides["cuda_graphs"] = {"enable_capture": False}
    # Every fusion is on by default, and --no-fuse-NAME turns enable_NAME off.
    names = [field.name.removeprefix("enable_") for field in dataclasses.fields(FusionConfig)]
    fusion = {f"enable_{name}": False for name in names if getattr(args, f"no_fuse_{name}")}
    if fusion:
        overrides["fusion"] = fusion
    print(f"building {args.model} -> {args.out}", file=sys.stderr)
    start = time.perf_counter()
    out = oiv2compile.build(args.model, args.out, overwrite=args.force, progress=_progress, **overrides)
    print(f"built {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _progress(phase: str, seconds: float | None) -> None:
    if seconds is None:
        print(f"  {phase} ...", file=sys.stderr, flush=True)
    else:
        print(f"  {phase}: {seconds:.2f} s", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    import oiv2compile
    from oiv2compile.errors import InvalidRequestError

    if args.token_ids is not None:
        try:
            prompt: Any = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            raise InvalidRequestError(
                f"--token-ids takes comma-separated whole numbers, not {args.token_ids!r}."
            ) from None
    else:
        prompt = args.prompt
    start = time.perf_counter()
    engine = oiv2compile.load(args.artifact, device=args.device)
    print(f"loaded {args.artifact} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    request = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.echo and isinstance(prompt, str):
        sys.stdout.write(prompt)
        sys.stdout.flush()
    if args.stream:
        for token in engine.stream([prompt], **request):
            sys.stdout.write(token.text if token.text is not None else f"{token.token_id} ")
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = engine.generate([prompt], **request)[0]
    if result.text is not None:
        print(result.text)
    print("token ids: " + ",".join(str(t) for t in result.token_ids), file=sys.stderr)
    print(
        f"{len(result.token_ids)} tokens ({result.finish_reason}); time to first token "
        f"{result.time_to_first_token_s * 1e3:.1f} ms; decode {result.decode_tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from oiv2compile.runtime.artifact import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    model = manifest.get("model", {})
    device = manifest.get("device", {})
    cfg = manifest.get("build_config", {})
    cache = manifest.get("cache", {})
    lines = [
        f"artifact     {args.artifact}",
        f"format       {manifest.get('format_version')} (oiv2compile {manifest.get('oiv2compile_version')}, "
        f"built {manifest.get('created')})",
        f"model        {model.get('architecture')} from {model.get('source')}, "
        f"{model.get('num_parameters', 0) / 1e6:.1f}M parameters",
        f"built with   torch {manifest.get('torch_version')}, transformers {manifest.get('transformers_version')}, "
        f"CUDA {manifest.get('cuda_version')}",
        f"device       {device.get('type')}"
        + (
            f" {device.get('name')} (capability {'.'.join(map(str, device.get('capability', [])))})"
            if device.get("name")
            else ""
        ),
        f"config       backend {cfg.get('backend')}, dtype {cfg.get('dtype')}, max_batch_size {cfg.get('max_batch_size')}, "
        f"max_seq_len {cache.get('max_seq_len')}, fingerprint {manifest.get('fingerprint')}",
        f"tokenizer    {manifest.get('tokenizer_note')}",
        f"quantization {_quantization_line(manifest.get('quantization'))}",
        "programs     " + ", ".join(sorted(manifest.get("programs", {}))),
        "passes",
    ]
    for program, passes in manifest.get("passes", {}).items():
        for name, rec in passes.items():
            lines.append(f"  {program:<10} {name:<22} {rec['count']:>5} rewrites {rec['ms']:>9.2f} ms")
    verification = manifest.get("verification")
    if verification:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in verification["relative_error"].items())
        noise = verification.get("hf_noise")
        allowed = f"tolerance {verification['tolerance']:.1e}" + (f", HF's own noise {noise:.1e}" if noise else "")
        lines.append(f"verification relative logit error vs HF: {errs} ({allowed})")
    else:
        lines.append("verification skipped")
    lines.append("phases")
    for phase, seconds in manifest.get("phases_s", {}).items():
        lines.append(f"  {phase:<32} {seconds:>9.2f} s")
    lines.append("files")
    for name in sorted(manifest.get("files", {})):
        path = args.artifact / name
        size = path.stat().st_size if path.exists() else 0
        lines.append(f"  {name:<40} {_size(size):>10}")
    print("\n".join(lines))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from oiv2compile.accuracy import evaluate, summary
    from oiv2compile.errors import InvalidRequestError

    for flag in ("window", "max_windows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidRequestError(f"--{flag.replace('_', '-')} must be at least 1, not {value}.")
    result = evaluate(
        args.artifact,
        data=args.data,
        reference=args.reference,
        window=args.window,
        max_windows=args.max_windows,
        device=args.device,
        progress=_eval_progress,
    )
    line = summary(result)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        print(line, file=sys.stderr)
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return 0


def _eval_progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r  {stage}: {done}/{total} windows", end=end, file=sys.stderr, flush=True)
    elif done == total:
        print(f"  {stage}: {total} windows scored", file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace) -> int:
    from oiv2compile.bench import BenchRequest, markdown_table, run_bench, write_report

    fields: dict[str, Any] = {}
    for name in ("dtype", "prompt_len", "new_tokens", "max_seq_len", "warmup", "repeats", "seed", "cache_dir"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    for flag, name in (("backends", "backends"), ("baselines", "baselines"), ("quant", "quants")):
        value = getattr(args, flag)
        if value is not None:
            fields[name] = _names(value)
    if args.batch_sizes is not None:
        fields["batch_sizes"] = _batch_sizes(args.batch_sizes)
    request = BenchRequest(
        model=args.model,
        rebuild=args.rebuild,
        fuse_norm_into_linear=not args.no_fuse_norm_into_linear,
        fuse_rope_into_attention=not args.no_fuse_rope_into_attention,
        int8_tiles=not args.no_int8_tiles,
        prefetched_attention=not args.no_prefetched_attention,
        **fields,
    )

    def checkpoint(partial: dict[str, Any]) -> None:  # a run stopped part-way keeps the rows it measured
        if not partial["complete"]:
            write_report(partial, args.out, plots=False)

    with _progress_bar() as progress:
        report = run_bench(request, progress, checkpoint)
    path, note = write_report(report, args.out)
    if note:
        print(f"oiv2compile: warning: {note}", file=sys.stderr)
    print(markdown_table(report), end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _batch_sizes(text: str) -> tuple[int, ...]:
    from oiv2compile.errors import InvalidRequestError

    try:
        return tuple(int(size) for size in _names(text))
    except ValueError:
        raise InvalidRequestError(
            f"--batch-sizes takes comma-separated whole numbers such as 1,8,32, not {text!r}."
        ) from None


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr, shown from the first report on: rows measured, and what runs now."""
    from tqdm import tqdm

    bars: list[Any] = []

    def update(what: str, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True))
        bars[0].set_description_str(what, refresh=False)
        bars[0].n = done
        bars[0].refresh()

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _serve(args: argparse.Namespace) -> int:
    import importlib.util

    from oiv2compile.errors import InvalidRequestError, Oiv2Error

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise Oiv2Error(
            f"oiv2compile serve needs the 'serve' extra ({', '.join(missing)} missing): pip install 'oiv2compile[serve]'."
        )
    if args.max_queue is not None and args.max_queue < 0:
        raise InvalidRequestError(f"--max-queue must be at least 0, not {args.max_queue}.")
    if args.prefill_token_budget is not None and args.prefill_token_budget < 1:
        raise InvalidRequestError(f"--prefill-token-budget must be at least 1, not {args.prefill_token_budget}.")
    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be between 0 and 65535, not {args.port}.")
    from oiv2compile.serve import serve

    options = {k: getattr(args, k) for k in ("max_queue", "prefill_token_budget") if getattr(args, k) is not None}
    serve(args.artifact, host=args.host, port=args.port, model_name=args.model_name, device=args.device, **options)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from oiv2compile.models import BUNDLED_MODELS, PRESETS

    rows = [
        (name, json.loads((path / "config.json").read_text()), "trained, bundled")
        for name, path in BUNDLED_MODELS.items()
    ]
    rows += [(name, fields, "random weights") for name, fields in PRESETS.items()]
    for name, fields, kind in rows:
        print(
            f"{name:<15} {fields['model_type']:<8} {fields['num_hidden_layers']:>3} layers, hidden {fields['hidden_size']:>5}, "
            f"vocab {fields['vocab_size']:>6}  {kind}"
        )
    return 0


def _quantization_line(record: dict[str, Any] | None) -> str:
    if not record:
        return "none"
    group = f", groups of {record['group_size']}" if record.get("group_size") else ""
    head = "" if record.get("output_head") else ", output head in full precision"
    return (
        f"{record['scheme']} weight-only ({record['method']}{group}{head}), {record['linears']} linears, "
        f"layout {record['layout']}"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
