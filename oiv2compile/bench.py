"""`oiv2compile bench`: every backend and the Hugging Face baselines measured side by side in one run.

For one model (a preset, a Hugging Face directory or an artifact already built) and each backend ×
weight quantization, one artifact is built with max_batch_size the largest batch asked for (or
reused from a cache keyed by the config fingerprint), loaded, warmed up and measured at every batch
size on the same seeded random prompts. The baselines run on the same prompts in the same process:
HF eager with its dynamic cache, and HF generate(cache_implementation="static"), which compiles
itself (its warm-up time is reported).

Timing follows ANCHORS.md: the engine's own per-step clock (CUDA events on a GPU, the host clock on
the CPU), warm-up excluded, median of `repeats` runs with the min-max spread. Decode tokens/s
excludes the prefill. The HF decode rate is (new_tokens - 1) / (time(new_tokens) - time(1 token)),
so its prefill is excluded alike; its per-step times come from a streamer (generate copies each
step's tokens to the host, which waits for the device anyway).

The roofline of a row is the copy bandwidth measured in the same run (bytes read plus written)
divided by the bytes one decode step must read: every weight once, plus each sequence's filled KV
cache. A row that cannot run here is `unavailable` with its reason, never a crash, never missing.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from oiv2compile import __version__
from oiv2compile.capture import CacheSpec
from oiv2compile.config import Backend, BuildConfig, DType
from oiv2compile.errors import InvalidRequestError, ModelNotFoundError, Oiv2Error
from oiv2compile.models import _first_line

SCHEMA_VERSION = 1
BACKENDS = ("inductor", "eager", "onnx", "tensorrt")
BASELINES = ("hf-eager", "hf-static")
QUANTS = ("none", "int8", "int4")
QUANTIZED_WITH_NORM_FUSION = ("int8", "int4")  # the rows --no-fuse-norm-into-linear builds apart
REPORT = "bench.json"
TABLE = "bench.md"
PLOTS = ("tokens_per_s_vs_batch.png", "time_per_token.png")
# A row's fields after kind, backend, quant, batch, status and reason; every row has every key, None where a
# figure does not apply or the row is unavailable.
ROW_FIELDS = (
    "decode_tok_s",  # {median, min, max} over the repeats, all sequences of the batch together
    "ttft_s",  # {median, min, max}: time to first token, the prefill
    "tpot_ms",  # {p50, p95, p99}: time per output token over every decode step of every repeat
    "e2e_s",  # {median, min, max}: whole request, prefill and every new token
    "step_ms",  # every decode step's time, all repeats, for the distribution plot
    "build_s",  # seconds to build the artifact (from its manifest when reused)
    "build_phases_s",  # {phase: seconds} of that build, from the artifact's manifest
    "reused",  # whether the artifact came from the cache
    "load_s",  # oiv2compile.load (or the HF model's load) until ready to generate
    "warmup_s",  # the warm-up runs before measuring (HF static compiles itself there)
    "peak_memory_bytes",  # peak over what the process held before the load (see memory_kind)
    "memory_kind",  # "gpu_allocated" (torch.cuda.max_memory_allocated), "gpu_device_used" (the GPU's used
    # memory, sampled: backends that allocate outside PyTorch) or "rss" (resident set size)
    "weight_bytes",
    "kv_bytes_per_token",
    "step_bytes",  # bytes one decode step must read
    "roofline_tok_s",  # copy bandwidth / step_bytes × batch
    "share_of_roofline",  # decode_tok_s median / roofline_tok_s
    "artifact",  # the artifact directory measured
)
_ROUND_TO = 128  # default max_seq_len: prompt + new tokens rounded up to this, which keeps builds small
_MEMORY_SAMPLE_S = 0.005

# progress(what is happening now, rows done, rows in all)
Progress = Callable[[str, int, int], None]
# checkpoint(the report so far): called after each row, with "complete" False until the last
Checkpoint = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class BenchRequest:
    """What to measure. The defaults are the command's defaults."""

    model: str  # a preset, a Hugging Face model directory, or an artifact directory
    backends: tuple[str, ...] | None = None  # None: every backend, or an artifact's own
    baselines: tuple[str, ...] = BASELINES
    quants: tuple[str, ...] | None = None  # None: none, or an artifact's own
    batch_sizes: tuple[int, ...] = (1,)
    prompt_len: int = 128
    new_tokens: int = 128
    dtype: str = DType.AUTO.value
    max_seq_len: int | None = None  # None: prompt_len + new_tokens rounded up to a multiple of 128
    warmup: int = 1
    repeats: int = 5
    seed: int = 0  # of the prompts and of a preset's random weights
    cache_dir: Path | None = None  # None: $OIV2_CACHE_DIR/bench or ~/.cache/oiv2compile/bench
    rebuild: bool = False  # build again even when the cache holds a matching artifact
    # False: int8 and int4 builds with --no-fuse-norm-into-linear (the others as they are)
    fuse_norm_into_linear: bool = True
    # False: every build with --no-fuse-rope-into-attention
    fuse_rope_into_attention: bool = True
    # False: int8 builds with --no-int8-tiles
    int8_tiles: bool = True
    # False: every build with --no-prefetched-attention
    prefetched_attention: bool = True

    def __post_init__(self) -> None:
        _check_names("--backends", self.backends or (), BACKENDS)
        _check_names("--baselines", self.baselines, BASELINES)
        _check_names("--quant", self.quants or (), QUANTS)
        if self.quants is not None and not self.quants:
            raise InvalidRequestError("--quant lists no quantization; give at least one of none, int8, int4.")
        if self.backends is not None and not self.backends and not self.baselines:
            raise InvalidRequestError("Nothing to measure: give at least one backend or baseline.")
        if not self.batch_sizes or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes
        ):
            sizes = ",".join(str(b) for b in self.batch_sizes)
            raise InvalidRequestError(f"--batch-sizes takes whole numbers of at least 1, not {sizes!r}.")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise InvalidRequestError(
                f"--batch-sizes lists a batch size twice: {','.join(map(str, self.batch_sizes))}."
            )
        if self.prompt_len < 1:
            raise InvalidRequestError(f"--prompt-len must be at least 1, not {self.prompt_len}.")
        if self.new_tokens < 2:
            raise InvalidRequestError(
                f"--new-tokens must be at least 2 so that decode steps run, not {self.new_tokens}."
            )
        if self.warmup < 0 or self.repeats < 1:
            raise InvalidRequestError("--warmup must be at least 0 and --repeats at least 1.")
        if self.dtype not in {d.value for d in DType}:
            raise InvalidRequestError(f"--dtype must be one of {[d.value for d in DType]}, not {self.dtype!r}.")
        if self.max_seq_len is not None and self.max_seq_len < self.prompt_len + self.new_tokens:
            raise InvalidRequestError(
                f"--max-seq-len {self.max_seq_len} cannot hold a prompt of {self.prompt_len} plus "
                f"{self.new_tokens} new tokens; give at least {self.prompt_len + self.new_tokens}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON values (lists and strings), for the report."""
        plain: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain[f.name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
        return plain


def _check_names(flag: str, names: Sequence[str], known: Sequence[str]) -> None:
    for name in names:
        if name not in known:
            raise InvalidRequestError(f"{flag} has {name!r}, which is not one of {', '.join(known)}.")
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"{flag} lists a name twice: {', '.join(names)}.")


# ---- figures --------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and min-max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def step_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, filled: float) -> float:
    """Bytes one decode step must read: every weight once, and each sequence's filled cache."""
    return weight_bytes + batch * filled * kv_bytes_per_token


def roofline_tok_s(bandwidth_gbs: float, bytes_per_step: float, batch: int) -> float:
    """The most tokens/s a batch can decode when every step only streams its bytes at the copy bandwidth."""
    return bandwidth_gbs * 1e9 / bytes_per_step * batch


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Copy of one large tensor into another on `device`, counting bytes read plus bytes written; the
    median of `repeats` copies after three unmeasured ones. 2 GiB on a GPU (far beyond L2), 256 MiB in
    host memory (beyond the last-level cache, and cheap enough for a CI machine)."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if cuda else 256 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - begin)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def _timing_figures(ttft: list[float], e2e: list[float], decode: list[float], steps: list[float]) -> dict:
    """The timing figures of a row from per-repeat values (seconds) and every decode step's time (seconds)."""
    step_ms = [s * 1e3 for s in steps]
    return {
        "decode_tok_s": spread(decode),
        "ttft_s": spread(ttft),
        "e2e_s": spread(e2e),
        "tpot_ms": {f"p{q}": percentile(step_ms, q) for q in (50, 95, 99)},
        "step_ms": [round(s, 4) for s in step_ms],
    }


def _engine_timings(batch: int, runs: list[list[float]]) -> dict:
    """Figures from the token_times_s of each repeat: [0] the time to first token, then one gap per step."""
    return _timing_figures(
        ttft=[times[0] for times in runs],
        e2e=[sum(times) for times in runs],
        decode=[batch * (len(times) - 1) / sum(times[1:]) for times in runs],
        steps=[gap for times in runs for gap in times[1:]],
    )


# ---- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """The MODEL argument, resolved."""

    name: str  # as given
    model_id: str  # what a manifest records as the model's source
    fields: dict[str, Any]  # the model's config fields (vocab_size, max_position_embeddings, ...)
    cache_key: str  # a short hash of the model for the artifact cache's directory names
    artifact: Path | None = None  # set when MODEL is an artifact
    manifest: dict[str, Any] | None = None  # the artifact's
    hf_model: str | None = None  # what load_model takes for the baselines; None when not known
    hf_missing: str = ""  # why the baselines have no model, when hf_model is None


@dataclass
class _Target:
    """One backend × quantization: the artifact that serves all its batch sizes, or why there is none."""

    backend: str
    quant: str
    reason: str | None = None
    path: Path | None = None
    build_s: float | None = None
    reused: bool | None = None


def run_bench(
    request: BenchRequest, progress: Progress | None = None, checkpoint: Checkpoint | None = None
) -> dict[str, Any]:
    """Build (or reuse), load and measure every requested backend × quantization × batch size and
    every baseline × batch size; return the report, whose rows carry the fields of ROW_FIELDS.
    `checkpoint` gets the report so far after each row (its "complete" False until the last), so that a
    run stopped part-way keeps what it measured."""
    source = _resolve_source(request)
    cfg = _base_config(request, source)
    device = torch.device(cfg.device.value)
    backends = request.backends if request.backends is not None else _default_backends(source)
    quants = request.quants if request.quants is not None else _default_quants(source)
    targets = [_target(backend, quant, source) for backend in backends for quant in quants]
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": request.model,
        "args": request.to_dict(),
        "device": device.type,
        "dtype": cfg.dtype.value,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "copy_bandwidth_gbs": None,
        "rows": [],
        "complete": False,
    }
    total = len(request.batch_sizes) * (len(targets) + len(request.baselines))
    filled = request.prompt_len + request.new_tokens / 2  # the average filled length over the decode

    def record(row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            row["step_bytes"] = step_bytes(row["weight_bytes"], row["kv_bytes_per_token"], row["batch"], filled)
            row["roofline_tok_s"] = roofline_tok_s(report["copy_bandwidth_gbs"], row["step_bytes"], row["batch"])
            row["share_of_roofline"] = row["decode_tok_s"]["median"] / row["roofline_tok_s"]
        report["rows"].append(row)
        report["complete"] = len(report["rows"]) == total
        if checkpoint is not None:
            checkpoint(report)

    tracker = _Tracker(progress, total, record)
    for target in targets:
        if target.reason is None:
            tracker.start(f"build {target.backend}/{target.quant}")
            _prepare_artifact(target, request, source, cfg)
    tracker.start("copy bandwidth")
    report["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
    prompts = _prompts(request, int(source.fields["vocab_size"]))

    for target in targets:
        _measure_engine(target, request, prompts, device, tracker)
    for baseline in request.baselines:
        _measure_baseline(baseline, request, source, cfg, prompts, device, tracker)
    report["complete"] = True
    return report


class _Tracker:
    """Counts measured rows, hands each to `record` as it is made, and tells `progress` what runs now."""

    def __init__(self, progress: Progress | None, total: int, record: Callable[[dict[str, Any]], None]) -> None:
        self.progress = progress
        self.total = total
        self.record = record
        self.done = 0

    def start(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what, self.done, self.total)

    def each_batch(self, label: str, batch_sizes: Sequence[int]) -> Iterator[int]:
        """Yield each batch size; the caller records that batch's row before asking for the next."""
        for batch in batch_sizes:
            self.start(f"{label} batch {batch}")
            yield batch
            self.done += 1
            self.start(f"{label} batch {batch}")

    def unavailable(self, kind: str, backend: str, quant: str, batch_sizes: Sequence[int], reason: str) -> None:
        """Record one unavailable row per batch size."""
        label = f"{backend}/{quant}" if kind == "oiv2compile" else backend
        for batch in self.each_batch(label, batch_sizes):
            self.record(_unavailable(kind, backend, quant, batch, reason))


def _row(kind: str, backend: str, quant: str, batch: int, **figures: Any) -> dict[str, Any]:
    """A measured row: every key of ROW_FIELDS, None where a figure does not apply."""
    row = {"kind": kind, "backend": backend, "quant": quant, "batch": batch, "status": "ok", "reason": None}
    row.update(dict.fromkeys(ROW_FIELDS))
    row.update(figures)
    return row


def _unavailable(kind: str, backend: str, quant: str, batch: int, reason: str) -> dict[str, Any]:
    """A row that cannot run here, with the one sentence that says why."""
    return {**_row(kind, backend, quant, batch), "status": "unavailable", "reason": reason}


def _resolve_source(request: BenchRequest) -> _Source:
    """What MODEL names: an artifact (a directory with manifest.json), a Hugging Face directory, or a preset."""
    from oiv2compile.models import BUNDLED_MODELS, PRESETS, preset_names
    from oiv2compile.runtime.artifact import MANIFEST, read_manifest

    name = request.model
    path = Path(name)
    if path.is_dir() and (path / MANIFEST).is_file():
        return _artifact_source(name, path, read_manifest(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is neither an oiv2compile artifact (manifest.json) nor a Hugging Face model directory "
                "(config.json); give one of those or a preset."
            )
        model_id = str(path.resolve())
        # The cache key covers the weights' sizes and times too, so that retrained weights are built again.
        stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
        fields = json.loads((path / "config.json").read_text())
        return _Source(name, model_id, fields, cache_key=_short_hash(f"{model_id}{stamps}"), hf_model=name)
    if name in BUNDLED_MODELS:
        fields = json.loads((BUNDLED_MODELS[name] / "config.json").read_text())
        return _Source(name, f"bundled:{name}", fields, cache_key=_short_hash(f"bundled:{name}"), hf_model=name)
    if name in PRESETS:
        return _Source(name, f"preset:{name}", PRESETS[name], cache_key=_short_hash(f"preset:{name}"), hf_model=name)
    raise ModelNotFoundError(
        f"{name} does not exist; give a Hugging Face model directory, an artifact or a preset "
        f"({', '.join(preset_names())})."
    )


def _artifact_source(name: str, path: Path, manifest: dict[str, Any]) -> _Source:
    recorded = manifest["model"]["source"]
    kind, _, preset = recorded.partition(":")
    hf_model: str | None = None
    hf_missing = ""
    if kind in ("preset", "bundled") and preset:
        hf_model = preset
    elif recorded == "object":
        hf_missing = "the artifact was built from a model object; give its Hugging Face directory to run the baselines"
    elif Path(recorded).is_dir():
        hf_model = recorded
    else:
        hf_missing = f"the artifact's model directory {recorded} does not exist here"
    return _Source(
        name,
        recorded,
        manifest["model"]["config"],
        cache_key="",
        artifact=path,
        manifest=manifest,
        hf_model=hf_model,
        hf_missing=hf_missing,
    )


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _base_config(request: BenchRequest, source: _Source) -> BuildConfig:
    """The resolved config every artifact of the run shares (backend and quantization aside); for an
    artifact, the one it was built with."""
    from oiv2compile.runtime.artifact import check_compatible

    needed = request.prompt_len + request.new_tokens
    if source.manifest is not None:
        cfg = BuildConfig.from_dict(source.manifest["build_config"])
        # An artifact this machine cannot run leaves nothing to measure: say so before measuring anything.
        check_compatible(source.manifest, torch.device(cfg.device.value))
        held = int(source.manifest["cache"]["max_seq_len"])
        if needed > held:
            raise InvalidRequestError(
                f"A prompt of {request.prompt_len} plus {request.new_tokens} new tokens needs {needed} cache positions "
                f"but the artifact holds {held}; lower --prompt-len or --new-tokens, or bench the model it was built from."
            )
        if request.dtype not in (DType.AUTO.value, cfg.dtype.value):
            raise InvalidRequestError(
                f"The artifact was built in {cfg.dtype.value}, not {request.dtype}; drop --dtype or bench the model "
                "it was built from."
            )
        if request.max_seq_len is not None:
            raise InvalidRequestError("--max-seq-len applies to builds; an artifact keeps the one it was built with.")
        return cfg
    limit = source.fields.get("max_position_embeddings")
    max_seq_len = request.max_seq_len or -(-needed // _ROUND_TO) * _ROUND_TO
    if limit:
        if max(needed, request.max_seq_len or 0) > limit:
            raise InvalidRequestError(
                f"{request.model} holds at most {limit} positions (max_position_embeddings); lower --prompt-len, "
                "--new-tokens or --max-seq-len."
            )
        max_seq_len = min(max_seq_len, limit)
    overrides = dict(dtype=request.dtype, seed=request.seed, max_batch_size=max(request.batch_sizes))
    cfg = BuildConfig().replace(max_seq_len=max_seq_len, **overrides)
    return cfg.resolve(cuda_available=torch.cuda.is_available())


def _default_backends(source: _Source) -> tuple[str, ...]:
    if source.manifest is not None:
        return (source.manifest["build_config"]["backend"],)
    return BACKENDS


def _default_quants(source: _Source) -> tuple[str, ...]:
    if source.manifest is not None:
        return (source.manifest["build_config"].get(_QUANT_FIELD, "none"),)
    return ("none",)


# The BuildConfig field that weight-only quantization (issue 5) adds, with the quantization's name as
# its value; while BuildConfig has no such field, int8 and int4 rows are unavailable.
_QUANT_FIELD = "quantization"


def _quant_overrides(quant: str) -> dict[str, str]:
    return {} if quant == "none" else {_QUANT_FIELD: quant}


def _target(backend: str, quant: str, source: _Source) -> _Target:
    """One backend × quantization, or why it cannot run: decided by what this version registers, so
    that a row becomes real as soon as its backend or quantization lands."""
    if backend not in {b.value for b in Backend}:
        return _Target(backend, quant, reason=f"oiv2compile has no {backend} backend in this version")
    if quant != "none" and _QUANT_FIELD not in {f.name for f in dataclasses.fields(BuildConfig)}:
        return _Target(backend, quant, reason="weight-only quantization is not implemented in this version")
    if source.manifest is not None:
        built = source.manifest["build_config"]
        built_quant = built.get(_QUANT_FIELD, "none")
        if (backend, quant) != (built["backend"], built_quant):
            return _Target(
                backend,
                quant,
                reason=f"MODEL is an artifact built with the {built['backend']} backend and quantization "
                f"{built_quant}; bench the model it was built from to measure others",
            )
    return _Target(backend, quant)


def default_cache_dir() -> Path:
    """Where built artifacts are kept between runs: $OIV2_CACHE_DIR/bench, else ~/.cache/oiv2compile/bench."""
    root = os.environ.get("OIV2_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "oiv2compile") / "bench"


def _prepare_artifact(target: _Target, request: BenchRequest, source: _Source, cfg: BuildConfig) -> None:
    """Point `target` at its artifact: MODEL itself, a matching one in the cache, or a fresh build.
    A build that fails with a user error (an option this backend refuses) makes its rows unavailable."""
    from oiv2compile.api import checked_config
    from oiv2compile.runtime.artifact import read_manifest

    if source.artifact is not None and source.manifest is not None:
        target.path, target.reused = source.artifact, True
        target.build_s = sum(source.manifest["phases_s"].values())
        return
    try:
        config = cfg.replace(backend=target.backend, **_quant_overrides(target.quant))
        if not request.fuse_norm_into_linear and target.quant in QUANTIZED_WITH_NORM_FUSION:  # others: their cache
            config = config.replace(fusion={"enable_norm_into_linear": False})
        if not request.fuse_rope_into_attention:
            config = config.replace(fusion={"enable_rope_into_attention": False})
        if not request.int8_tiles and target.quant == "int8":
            config = config.replace(quant={"int8_tiles": False})
        if not request.prefetched_attention:
            config = config.replace(attention={"enable_prefetched_decode": False})
        path = (request.cache_dir or default_cache_dir()) / f"{config.fingerprint()}-{source.cache_key}"
        if not request.rebuild and _reusable(path, config, source.model_id):
            target.build_s, target.reused = sum(read_manifest(path)["phases_s"].values()), True
        else:
            checked_config(config)  # a missing extra fails here, before a process starts
            target.build_s, target.reused = _build_in_child_process(source.name, path, config), False
        target.path = path
    except Oiv2Error as exc:
        target.reason = str(exc)
    finally:
        _release(torch.device(cfg.device.value))


def _build_in_child_process(model: str, path: Path, config: BuildConfig) -> float:
    """Build in a process of its own and return the build's seconds (its start-up excluded). What a
    build leaves in memory goes with that process: torch.export and Inductor keep state between
    builds, and one process building the bf16, int8 and int4 artifacts of llama-8b ran out of an
    H100's 80 GB in the third (2026-11-27). A user error in the build is raised here as it was there."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_timed_build, model, str(path), config).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"The process building {path} ended without a result (killed, or out of host memory?)."
            ) from None


def _timed_build(model: str, path: str, config: BuildConfig) -> float:
    from oiv2compile.api import build

    start = time.perf_counter()
    build(model, path, config=config, overwrite=True)
    return time.perf_counter() - start


def _reusable(path: Path, config: BuildConfig, model_id: str) -> bool:
    """Whether `path` holds an artifact of this model and config that this installation can load."""
    from oiv2compile.errors import ArtifactError
    from oiv2compile.runtime.artifact import MANIFEST, read_manifest

    if not (path / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(path)
    except ArtifactError:
        return False
    return (
        manifest.get("fingerprint") == config.fingerprint()
        and manifest.get("model", {}).get("source") == model_id
        and manifest.get("torch_version") == torch.__version__
        and manifest.get("oiv2compile_version") == __version__
    )


def _prompts(request: BenchRequest, vocab_size: int) -> list[list[int]]:
    """Seeded random token ids, one prompt per sequence of the largest batch; batch b takes the first b."""
    generator = torch.Generator().manual_seed(request.seed)
    low = min(100, vocab_size - 1)  # clear of the special tokens at the start of most vocabularies
    shape = (max(request.batch_sizes), request.prompt_len)
    return torch.randint(low, vocab_size, shape, generator=generator).tolist()


def _measure_engine(
    target: _Target, request: BenchRequest, prompts: list[list[int]], device: torch.device, tracker: _Tracker
) -> None:
    """Load the artifact once and measure each batch size: warm-up runs, then `repeats` timed ones."""
    from oiv2compile.api import load

    label = f"{target.backend}/{target.quant}"
    if target.path is None:  # unavailable: _target or _prepare_artifact said why
        tracker.unavailable("oiv2compile", target.backend, target.quant, request.batch_sizes, str(target.reason))
        return
    # ONNX Runtime allocates on the GPU from its own arena, which PyTorch's allocator does not see.
    with _PeakMemory(device, outside_torch=target.backend == "onnx") as memory:
        start = time.perf_counter()
        try:
            engine = load(target.path)
        except Oiv2Error as exc:
            tracker.unavailable("oiv2compile", target.backend, target.quant, request.batch_sizes, str(exc))
            return
        _synchronize(device)
        load_s = time.perf_counter() - start
        common = dict(
            build_s=target.build_s,
            build_phases_s=engine.manifest.get("phases_s"),
            reused=target.reused,
            load_s=load_s,
            memory_kind=memory.kind,
            weight_bytes=engine.manifest["weights"]["bytes"],
            kv_bytes_per_token=engine.spec.bytes_per_token(),
            artifact=str(target.path),
        )
        for batch in tracker.each_batch(label, request.batch_sizes):
            if batch > engine.max_batch_size:
                reason = (
                    f"the artifact serves batches of at most {engine.max_batch_size}; bench the model it was built "
                    f"from to build one for batch {batch}"
                )
                tracker.record(_unavailable("oiv2compile", target.backend, target.quant, batch, reason))
                continue
            memory.reset_peak()
            batch_prompts = prompts[:batch]
            start = time.perf_counter()
            for _ in range(request.warmup):
                engine.generate(batch_prompts, max_new_tokens=request.new_tokens, stop_token_ids=[])
            _synchronize(device)
            warmup_s = time.perf_counter() - start
            runs = [
                engine.generate(batch_prompts, max_new_tokens=request.new_tokens, stop_token_ids=[])[0].token_times_s
                for _ in range(request.repeats)
            ]
            figures = _engine_timings(batch, runs)
            tracker.record(
                _row(
                    "oiv2compile",
                    target.backend,
                    target.quant,
                    batch,
                    warmup_s=warmup_s,
                    peak_memory_bytes=memory.peak(),
                    **common,
                    **figures,
                )
            )
        del engine
    _release(device)


def _measure_baseline(
    baseline: str,
    request: BenchRequest,
    source: _Source,
    cfg: BuildConfig,
    prompts: list[list[int]],
    device: torch.device,
    tracker: _Tracker,
) -> None:
    """Load the Hugging Face model once and time its generate() at each batch size: time to first
    token from a 1-token generate, the decode rate and per-step times from a streamer's notes within
    each full generate (never a difference of two runs, which noise can make negative)."""
    from oiv2compile.models import load_model

    if source.hf_model is None:
        tracker.unavailable("baseline", baseline, "none", request.batch_sizes, source.hf_missing)
        return
    dtype = getattr(torch, cfg.dtype.value)
    with _PeakMemory(device) as memory:
        start = time.perf_counter()
        try:
            hf = load_model(source.hf_model, dtype=dtype, device=device.type, seed=cfg.seed).model
        except Oiv2Error as exc:
            tracker.unavailable("baseline", baseline, "none", request.batch_sizes, str(exc))
            return
        _synchronize(device)
        load_s = time.perf_counter() - start
        common = dict(
            load_s=load_s,
            memory_kind=memory.kind,
            weight_bytes=_tensor_bytes(hf),
            kv_bytes_per_token=CacheSpec.for_model(
                hf.config, max_seq_len=1, max_batch_size=1, dtype=dtype
            ).bytes_per_token(),
        )
        for batch in tracker.each_batch(baseline, request.batch_sizes):
            memory.reset_peak()
            input_ids = torch.tensor(prompts[:batch], device=device)
            try:
                warmup_s, first, full, decoding, steps = _hf_runs(
                    hf, input_ids, request, static=baseline == "hf-static"
                )
            except (
                Exception
            ) as exc:  # HF's own generate (its static cache compiles itself) failing here is the row's result
                reason = f"Hugging Face generate failed here: {type(exc).__name__}: {_first_line(exc)}"
                tracker.record(_unavailable("baseline", baseline, "none", batch, reason))
                continue
            decode = [batch * (request.new_tokens - 1) / seconds for seconds in decoding]
            figures = _timing_figures(ttft=first, e2e=full, decode=decode, steps=steps)
            tracker.record(
                _row(
                    "baseline",
                    baseline,
                    "none",
                    batch,
                    warmup_s=warmup_s,
                    peak_memory_bytes=memory.peak(),
                    **common,
                    **figures,
                )
            )
        del hf
    _release(device)


def _hf_runs(
    hf: Any, input_ids: torch.Tensor, request: BenchRequest, *, static: bool
) -> tuple[float, list[float], list[float], list[float], list[float]]:
    """Warm-up seconds; then per repeat the seconds of a 1-token generate, of a full one, and of the
    full one's decode steps (first new token to last); and the time of every decode step of the full
    ones. The static cache compiles during its first two runs."""
    kwargs: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    start = time.perf_counter()
    for _ in range(max(request.warmup, 2) if static else request.warmup):
        _hf_generate_s(hf, input_ids, request.new_tokens, **kwargs)
        _hf_generate_s(hf, input_ids, 1, **kwargs)
    warmup_s = time.perf_counter() - start
    first, full, decoding, steps = [], [], [], []
    for _ in range(request.repeats):
        first.append(_hf_generate_s(hf, input_ids, 1, **kwargs))
        clock = _TokenClock()
        full.append(_hf_generate_s(hf, input_ids, request.new_tokens, streamer=clock, **kwargs))
        gaps = clock.gaps()
        decoding.append(sum(gaps))
        steps.extend(gaps)
    return warmup_s, first, full, decoding, steps


def _hf_generate_s(hf: Any, input_ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> float:
    """Seconds of one greedy HF generate of exactly `new_tokens` tokens, the device synchronised."""
    _synchronize(input_ids.device)
    start = time.perf_counter()
    hf.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )
    _synchronize(input_ids.device)
    return time.perf_counter() - start


class _TokenClock:
    """A generate() streamer that notes the host time of each new token. generate hands it the prompt
    first, then each step's tokens copied to the host, which waits for the device: the gaps between
    the notes are the decode steps' times."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        """generate() calls this when it is done; the notes are complete already."""

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def _tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (tied weights once)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers())
    }
    return sum(storages.values())


class _PeakMemory:
    """Peak memory over what the process held on entry. On CUDA the caching allocator's peak of
    allocated memory, or, for a backend that allocates outside PyTorch (ONNX Runtime's own arena),
    the device's used memory (total - free, the whole GPU's); on the CPU the resident set size. The
    last two are sampled by a thread every 5 ms (0 when they never grew past the entry value: freed
    memory an allocator kept is reused without growing it)."""

    def __init__(self, device: torch.device, outside_torch: bool = False) -> None:
        self.device = device
        self.allocator = device.type == "cuda" and not outside_torch
        self.kind = "gpu_allocated" if self.allocator else "gpu_device_used" if device.type == "cuda" else "rss"
        self.before = 0
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> int:
        if self.kind == "gpu_device_used":
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        return int(self._process.memory_info().rss)

    def __enter__(self) -> _PeakMemory:
        _release(self.device)
        if self.allocator:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self.before = self._peak = self._now()
            self._thread = threading.Thread(target=self._sample, name="oiv2-bench-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(_MEMORY_SAMPLE_S):
            now = self._now()
            with self._lock:
                self._peak = max(self._peak, now)

    def reset_peak(self) -> None:
        """Forget the peak so far; what is held now (weights, cache) still counts."""
        if self.allocator:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with self._lock:
                self._peak = self._now()

    def peak(self) -> int:
        if self.allocator:
            return torch.cuda.max_memory_allocated(self.device) - self.before
        now = self._now()
        with self._lock:
            return max(0, max(self._peak, now) - self.before)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free what the last engine, model or build left, so that the next one's memory starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- environment ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and software a report was measured with."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "driver": _nvidia_driver() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "oiv2compile": __version__,
        "commit": commit(),
    }


def commit(package: Path | None = None) -> str:
    """The commit measured: $OIV2_COMMIT where set (a copy of the tree whose git does not describe it),
    else HEAD of the package's repository, with "+changes" where the package's tracked files differ
    from HEAD (a copy of a later tree over an older checkout says so rather than naming the older one)."""
    if os.environ.get("OIV2_COMMIT"):
        return os.environ["OIV2_COMMIT"]
    package = package or Path(__file__).parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=package, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+changes" if changed else head


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- output ---------------------------------------------------------------------------------------


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per backend × quantization × batch size and baseline ×
    batch size, then each batch's best oiv2compile decode rate against the best baseline's."""
    env, args = report["environment"], report["args"]
    lines = [
        f"{report['model']}, {report['dtype']}, prompt {args['prompt_len']} tokens, {args['new_tokens']} new tokens, "
        f"on {env['device']} ({report['device']}); copy bandwidth {report['copy_bandwidth_gbs']:.1f} GB/s; "
        f"torch {env['torch']}, commit {env['commit']}",
        "",
        "| backend | quant | batch | decode tok/s (min-max) | share of roofline | TTFT ms | TPOT ms p50 / p95 / p99 "
        "| e2e s | build s | load s | warm-up s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        quant = (
            row["quant"]
            + (
                " (norms apart)"
                if row["quant"] in QUANTIZED_WITH_NORM_FUSION and args.get("fuse_norm_into_linear") is False
                else ""
            )
            + (" (rope apart)" if args.get("fuse_rope_into_attention") is False else "")
            + (" (row-major)" if row["quant"] == "int8" and args.get("int8_tiles") is False else "")
            + (" (Triton attention)" if args.get("prefetched_attention") is False else "")
        )
        head = f"| {row['backend']} | {quant} | {row['batch']} |"
        if row["status"] != "ok":
            lines.append(f"{head} unavailable: {row['reason']} |" + " |" * 8)
            continue
        decode, tpot = row["decode_tok_s"], row["tpot_ms"]
        build = "—" if row["build_s"] is None else f"{row['build_s']:.1f}" + (" (reused)" if row["reused"] else "")
        peak = f"{row['peak_memory_bytes'] / 2**20:.0f}" + (
            " (GPU used)" if row["memory_kind"] == "gpu_device_used" else ""
        )
        lines.append(
            f"{head} {decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) | {row['share_of_roofline']:.1%} | "
            f"{row['ttft_s']['median'] * 1e3:.2f} | {tpot['p50']:.2f} / {tpot['p95']:.2f} / {tpot['p99']:.2f} | "
            f"{row['e2e_s']['median']:.3f} | {build} | {row['load_s']:.2f} | {row['warmup_s']:.2f} | "
            f"{peak} |"
        )
    lines.append("")
    for batch in args["batch_sizes"]:
        best = {
            kind: max(
                (r for r in report["rows"] if r["kind"] == kind and r["batch"] == batch and r["status"] == "ok"),
                key=lambda r: r["decode_tok_s"]["median"],
                default=None,
            )
            for kind in ("oiv2compile", "baseline")
        }
        ours, theirs = best["oiv2compile"], best["baseline"]
        if ours is not None and theirs is not None:
            ratio = ours["decode_tok_s"]["median"] / theirs["decode_tok_s"]["median"]
            lines.append(
                f"batch {batch}: {ours['backend']}/{ours['quant']} decodes {ratio:.2f}x as fast as {theirs['backend']}."
            )
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], out_dir: Path, *, plots: bool = True) -> tuple[Path, str | None]:
    """Write the plots (when matplotlib is installed and `plots` is set), bench.json and the markdown table
    (bench.md) into `out_dir`. Returns the JSON's path and, when no plot was written, why; the JSON records
    both as "plots" and "plots_note". Each file is replaced whole, so a run stopped while writing leaves
    the previous version, not half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        names, note = write_plots(report, out_dir)
    else:
        names, note = [], "plots are written when the run completes"
    path = out_dir / REPORT
    _replace(path, json.dumps({**report, "plots": names, "plots_note": note}, indent=2) + "\n")
    _replace(out_dir / TABLE, markdown_table(report))
    return path, note


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_plots(report: dict[str, Any], out_dir: Path) -> tuple[list[str], str | None]:
    """tokens_per_s_vs_batch.png (decode rate against batch size, one line per backend × quantization
    and baseline) and time_per_token.png (the distribution of decode-step times of every row)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return [], "matplotlib is not installed, so no plots were written; pip install 'oiv2compile[bench]'"
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        return [], "no row could run here, so there is nothing to plot"
    title = f"{report['model']} {report['dtype']}, {report['environment']['device']}"

    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(_label(row), []).append(row)
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["batch"])
        medians = [p["decode_tok_s"]["median"] for p in points]
        errors = [
            [m - p["decode_tok_s"]["min"] for m, p in zip(medians, points, strict=True)],
            [p["decode_tok_s"]["max"] - m for m, p in zip(medians, points, strict=True)],
        ]
        ax.errorbar([p["batch"] for p in points], medians, yerr=errors, marker="o", capsize=3, label=label)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(out_dir / PLOTS[0])

    fig = Figure(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot([r["step_ms"] for r in rows], whis=(1, 99))
    ax.set_xticks(range(1, len(rows) + 1), [f"{_label(r)} b{r['batch']}" for r in rows], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("time per output token, ms (whiskers p1-p99)")
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.savefig(out_dir / PLOTS[1])
    return list(PLOTS), None


def _label(row: dict[str, Any]) -> str:
    return row["backend"] if row["quant"] == "none" else f"{row['backend']} {row['quant']}"
