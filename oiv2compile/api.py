"""The two entry points: `build()` compiles a model into an artifact, `load()` turns one into an Engine.

build:  load_model -> capture (prefill, decode) -> passes -> checks -> save weights -> backend.lower
        -> tokenizer -> manifest, all inside a staging directory renamed into place at the end.
load:   manifest -> compatibility and checksums -> weights -> backend.load -> Engine (captures graphs).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from oiv2compile import __version__, _torch_compat
from oiv2compile.backends import get_backend
from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec, CapturedProgram, ProgramSpec, capture
from oiv2compile.config import Backend, BuildConfig, Device, DType, Quantization
from oiv2compile.errors import ArtifactError, ConfigError, UnsupportedModelError
from oiv2compile.models import SUPPORTED_MODEL_TYPES, load_model
from oiv2compile.passes import pipeline, run_passes
from oiv2compile.passes.quantize_weights import DECODER_LAYER as _DECODER_LAYER
from oiv2compile.runtime import artifact
from oiv2compile.runtime.engine import Engine
from oiv2compile.verify import check_pass_counts, verify_against_hf

log = logging.getLogger(__name__)

# progress(phase, None) when a phase starts, progress(phase, seconds) when it ends.
Progress = Callable[[str, "float | None"], None]

_DEFAULT_MAX_SEQ_LEN = 2048


def build(
    model: str | Path | Any,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **overrides: Any,
) -> Path:
    """Compile `model` (a HF model directory, a preset name or a transformers model) into an artifact at `out`.

    `overrides` replace fields of `config`, e.g. `build("llama-tiny", "out", max_batch_size=4)`.
    """
    cfg = checked_config((config or BuildConfig()).replace(**overrides))
    backend = get_backend(cfg.backend)
    out = Path(out)
    phases = _Phases(progress)
    device = _build_device(cfg)
    dtype = getattr(torch, cfg.dtype.value)

    # Weights this build loaded or made; their storage is freed when it ends (see _freeing).
    owned: list[torch.Tensor] = []
    with artifact.staging_directory(out, overwrite=overwrite) as staging, _freeing(owned):
        with phases("load model"):
            loaded = load_model(model, dtype=dtype, device=device, seed=cfg.seed, tokenizer=tokenizer)
        hf = loaded.model
        if loaded.source != "object":  # a model object belongs to the caller: leave it alone
            owned.extend([*hf.parameters(), *hf.buffers()])
        arch = type(hf).__name__
        if hf.config.model_type not in SUPPORTED_MODEL_TYPES:
            log.warning(
                "%s is not among the tested architectures (%s); the build goes on and fails if the passes or the "
                "check against Hugging Face's forward do not hold",
                arch,
                ", ".join(SUPPORTED_MODEL_TYPES),
            )
        max_seq_len = _max_seq_len(cfg, hf.config)
        _check_attention_kind(hf.config, arch, max_seq_len)
        spec = CacheSpec.for_model(hf.config, max_seq_len=max_seq_len, max_batch_size=cfg.max_batch_size, dtype=dtype)

        programs: dict[str, CapturedProgram] = {}
        pass_report: dict[str, Any] = {}
        for program in _programs(cfg):
            with phases(f"capture {program.name}"):
                programs[program.name] = capture(hf, spec, program)
            if loaded.source != "object":
                owned.extend(_program_weights(programs[program.name].graph_module).values())
            with phases(f"passes {program.name}"):
                records = run_passes(programs[program.name].graph_module, cfg, pipeline(cfg), label=program.name)
            if program is not PREFILL:
                _share_pass_weights(programs[PREFILL.name].graph_module, programs[program.name].graph_module)
            owned.extend(_made_by_passes(programs[program.name].graph_module, hf))
            check_pass_counts(
                records, spec, arch, program.name, _linears_to_quantize(hf, cfg), _embeddings_to_quantize(hf, cfg)
            )
            pass_report[program.name] = {r.name: {"count": r.count, "ms": round(r.ms, 3)} for r in records}

        verification = None
        if cfg.enable_verification:
            with phases("verify against HF"):
                verification = verify_against_hf(hf, programs, spec)

        with phases("save weights"):
            weights = artifact.save_weights(_program_weights(programs[PREFILL.name].graph_module), staging)
        entries = {}
        for name, captured in programs.items():
            with phases(f"lower {name} ({cfg.backend.value})"):
                entries[name] = backend.lower(captured, staging, cfg)

        tokenizer_dir = None
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(staging / "tokenizer"))
            tokenizer_dir = "tokenizer"

        manifest = {
            "format_version": artifact.FORMAT_VERSION,
            "oiv2compile_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "transformers_version": transformers_version(),
            "cuda_version": torch.version.cuda if device.type == "cuda" else None,
            "device": _device_record(device),
            "model": {
                "source": loaded.source,
                "architecture": arch,
                "model_type": hf.config.model_type,
                "supported": hf.config.model_type in SUPPORTED_MODEL_TYPES,
                "vocab_size": hf.config.vocab_size,
                "eos_token_id": hf.config.eos_token_id,
                "num_parameters": sum(p.numel() for p in hf.parameters()),
                "config": hf.config.to_dict(),
            },
            "build_config": cfg.to_dict(),
            "fingerprint": cfg.fingerprint(),
            "cache": spec.to_dict(),
            "programs": entries,
            "weights": weights,
            "tokenizer": tokenizer_dir,
            "tokenizer_note": loaded.tokenizer_note,
            "quantization": _quantization_record(cfg, programs[PREFILL.name].graph_module),
            "passes": pass_report,
            "verification": verification,
            "phases_s": phases.seconds,
        }
        with phases("write manifest"):
            artifact.write_manifest(staging, manifest)
    return out


def load(path: str | Path, device: str | torch.device | None = None) -> Engine:
    """Load an artifact, check it, and return an Engine ready to generate (CUDA graphs captured)."""
    root = Path(path)
    manifest = artifact.read_manifest(root)
    target = torch.device(device if device is not None else manifest.get("device", {}).get("type", "cpu"))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    artifact.check_compatible(manifest, target)
    artifact.verify_files(root, manifest)

    import oiv2compile.kernels  # noqa: F401  (registers the oiv2 ops the programs call)

    cfg = BuildConfig.from_dict(manifest["build_config"])
    spec = CacheSpec.from_dict(manifest["cache"])
    with _on_device(target):
        weights = artifact.load_weights(root, manifest["weights"], target)
        backend = get_backend(cfg.backend)
        programs = {name: backend.load(root, entry, weights) for name, entry in manifest["programs"].items()}
        tokenizer = _load_tokenizer(root, manifest)
        return Engine(
            path=root,
            manifest=manifest,
            programs=programs,
            spec=spec,
            device=target,
            tokenizer=tokenizer,
            decode_buckets=cfg.decode_buckets(),
            # ONNX Runtime launches its own kernels: its programs are not captured in CUDA graphs.
            capture_graphs=cfg.cuda_graphs.enable_capture and cfg.backend is not Backend.ONNX,
        )


# ---- helpers --------------------------------------------------------------------------------------


class _Phases:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name, None)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if self.progress:
            self.progress(name, self.seconds[name])


def _programs(cfg: BuildConfig) -> list[ProgramSpec]:
    programs = [PREFILL, DECODE]
    if cfg.enable_batch1_decode and cfg.device is Device.CUDA and cfg.max_batch_size > 1:
        programs.append(DECODE_B1)
    return programs


def _build_device(cfg: BuildConfig) -> torch.device:
    if cfg.device is Device.CUDA:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _max_seq_len(cfg: BuildConfig, config: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_SEQ_LEN
    if cfg.max_seq_len is None:
        return min(_DEFAULT_MAX_SEQ_LEN, limit)
    if cfg.max_seq_len > limit:
        raise ConfigError(
            f"max_seq_len {cfg.max_seq_len} exceeds the model's max_position_embeddings ({limit}); use at most {limit}."
        )
    return cfg.max_seq_len


def _check_attention_kind(config: Any, arch: str, max_seq_len: int) -> None:
    """Refuse attention that the causal mask of capture does not express. Sliding-window layers are
    harmless only while no sequence outgrows the window; other layer kinds (chunked, linear) and
    soft-capped scores are not implemented."""
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    uses_window = window is not None and (not layer_types or "sliding_attention" in layer_types)
    if window is not None and uses_window and max_seq_len > window:
        raise UnsupportedModelError(
            f"{arch} uses sliding-window attention over {window} tokens, which this version does not implement; "
            f"build with --max-seq-len {window} or less."
        )
    other = layer_types - {"full_attention", "sliding_attention"}
    if other:
        raise UnsupportedModelError(
            f"{arch} has {', '.join(sorted(other))} layers, which this version does not implement; supported "
            f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(
            f"{arch} soft-caps its attention scores, which this version does not implement; supported "
            f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _linears_to_quantize(hf: Any, cfg: BuildConfig) -> int:
    """How many linear layers quantize_weights must rewrite: those of the decoder layers, and the
    output head when it is included."""
    if cfg.quantization is Quantization.NONE:
        return 0
    linears = [name for name, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    in_layers = [name for name in linears if _DECODER_LAYER.search(f".{name}.")]
    return len(linears) if cfg.quant.include_output_head else len(in_layers)


def _embeddings_to_quantize(hf: Any, cfg: BuildConfig) -> int:
    """How many token-embedding lookups quantize_embedding must rewrite: the one lookup, unless a
    table tied to a head left in full precision stays float."""
    if cfg.quantization is Quantization.NONE or not cfg.quant.include_embedding:
        return 0
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    return 0 if tied and not cfg.quant.include_output_head else 1


def _quantization_record(cfg: BuildConfig, gm: torch.fx.GraphModule) -> dict[str, Any] | None:
    """What the manifest says of the quantized weights: scheme, method, group, layout and bytes."""
    if cfg.quantization is Quantization.NONE:
        return None
    from oiv2compile.kernels.linear_int4 import LAYOUT as INT4_LAYOUT
    from oiv2compile.kernels.linear_int8 import LAYOUT as INT8_LAYOUT

    int8 = cfg.quantization is Quantization.INT8
    rewritten = [n for n in gm.graph.nodes if n.op == "call_function" and "quantized" in n.meta.get("oiv2", {})]
    lookups = [n for n in rewritten if n.meta["oiv2"].get("lookup")]
    default = INT8_LAYOUT if int8 else INT4_LAYOUT
    return {
        "scheme": cfg.quantization.value,
        "method": cfg.quant.method,
        "group_size": None if int8 else cfg.quant.group_size,
        # What the linears read (use_cuda_kernels repacks int4 for the tensor cores) and the lookup.
        "layout": ", ".join(sorted({n.meta["oiv2"].get("layout", default) for n in rewritten if n not in lookups}))
        or default,
        "embedding_layout": default if lookups else None,
        "output_head": cfg.quant.include_output_head,
        "embedding": bool(lookups),
        "linears": len(rewritten) - len(lookups),
        "weights": sorted(n.meta["oiv2"]["quantized"] for n in rewritten if n not in lookups),
    }


def checked_config(cfg: BuildConfig) -> BuildConfig:
    """`cfg` resolved for this machine, once its backend accepts it: a missing extra or a refused
    option fails here, before any work."""
    cfg = cfg.resolve(cuda_available=torch.cuda.is_available())
    get_backend(cfg.backend).check(cfg)
    return cfg


def _program_weights(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the program holds as an attribute (parameters, buffers, constants), by name."""
    weights: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
    weights.update(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.find_nodes(op="get_attr"):
        owner_name, _, leaf = node.target.rpartition(".")
        value = getattr(gm.get_submodule(owner_name), leaf)
        if isinstance(value, torch.Tensor):
            weights[node.target] = value
    return weights


def _made_by_passes(gm: torch.fx.GraphModule, hf: torch.nn.Module) -> list[torch.Tensor]:
    """The program's tensors that share no storage with the model's own (fused and quantized weights
    the passes made): the build frees them when it ends, as it does the weights it loaded."""
    models = {t.untyped_storage().data_ptr() for t in (*hf.parameters(), *hf.buffers())}
    return [t for t in _program_weights(gm).values() if t.untyped_storage().data_ptr() not in models]


def _share_pass_weights(first: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Point `gm`'s pass-made buffers (fused and quantized weights) at the first program's tensors of
    the same name. The passes make them the same way from the same weights in every program, so one
    copy is enough; without this each program would hold its own until the build ends (9 GB of fused
    bf16 weights per program for an 8B model)."""
    shared = dict(first.named_buffers())
    for name, tensor in list(gm.named_buffers()):
        other = shared.get(name)
        if other is None or other is tensor or other.shape != tensor.shape or other.dtype != tensor.dtype:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        owner.register_buffer(leaf, other, persistent=leaf not in owner._non_persistent_buffers_set)


def _device_record(device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        # Compiled CPU code uses the best vector ISA of the build host; load checks the host has it.
        isas = _torch_compat.host_cpu_isas()
        return {"type": "cpu", "machine": platform.machine(), "cpu_isa": isas[0] if isas else "none"}
    if device.type != "cuda":
        return {"type": device.type}
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
    }


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_tokenizer(root: Path, manifest: dict[str, Any]) -> Any | None:
    if not manifest.get("tokenizer"):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root / manifest["tokenizer"]))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"The artifact's tokenizer could not be loaded ({exc}); rebuild the artifact.") from None


@contextlib.contextmanager
def _freeing(owned: list[torch.Tensor]) -> Iterator[None]:
    """At the end of a build, free the storage of the weights it loaded or made. torch.export and
    AOTInductor keep traced graphs in module-level state (what they keep differs between torch
    versions), and through them the model: without this an 8B build left 16 GB on the GPU. Emptying
    each tensor in place frees its memory whoever still refers to it."""
    try:
        yield
    finally:
        _torch_compat.release_export_state()
        for tensor in owned:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        owned.clear()


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


__all__ = ["Backend", "BuildConfig", "DType", "Device", "build", "load"]
