"""Where a model comes from: a local Hugging Face directory, a built-in preset, or a model object.

Presets come in two kinds. The bundled models (`tinycode`, `tinycode-draft`) have trained weights
and a tokenizer and ship inside the package as Hugging Face directories (tools/train_tinycode.py made
them). The others are random-weight models made from public models' configs (no download), for
benchmarking and tests: the `*-tiny` ones are a few MB and carry a byte-level tokenizer so that text
prompts work offline; the full-size ones have no tokenizer (their vocabulary would need the real one).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oiv2compile.errors import ModelNotFoundError, UnsupportedModelError

log = logging.getLogger(__name__)

# Architectures built and checked against Hugging Face by this version's tests. Others are tried
# when their HF implementation uses the standard attention interface; the build's verification
# step refuses any that the passes do not transform exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_TINY = dict(
    vocab_size=259,  # 256 bytes + <s>, </s>, <pad>: every id decodes with the byte-level tokenizer
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)

# Shapes copied from the public config.json of each model.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", **_TINY),
    "mistral-tiny": dict(model_type="mistral", sliding_window=None, **_TINY),
    "qwen2-tiny": dict(model_type="qwen2", use_sliding_window=False, **{**_TINY, "tie_word_embeddings": True}),
    # meta-llama/Llama-3.2-1B
    "llama-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # mistralai/Mistral-7B-v0.3 (no sliding window)
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}


BUNDLED_DIR = Path(__file__).parent / "bundled"
# Trained models shipped with the package, by preset name.
BUNDLED_MODELS = {name: BUNDLED_DIR / name for name in ("tinycode", "tinycode-draft")}
# The held-out files of the tinycode corpus (oiv2compile.datasets), the default data of `eval`.
TINYCODE_HELDOUT = BUNDLED_DIR / "tinycode-heldout.jsonl.xz"


def preset_names() -> list[str]:
    return [*BUNDLED_MODELS, *PRESETS]


def bundled_model_dir(source: str) -> Path | None:
    """The directory of a bundled model named by a manifest's source ("bundled:NAME"), if it is one."""
    name = source.removeprefix("bundled:")
    return BUNDLED_MODELS.get(name) if source.startswith("bundled:") else None


@dataclass
class LoadedModel:
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None  # transformers.PreTrainedTokenizerBase
    source: str  # "bundled:NAME", "preset:NAME", a directory path, or "object"
    tokenizer_note: str  # why there is or is not a tokenizer


def load_model(
    model: str | Path | Any,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    tokenizer: Any | None = None,
) -> LoadedModel:
    """Load a preset, a local HF directory or a model object onto `device` in `dtype`."""
    if not isinstance(model, (str, Path)):
        return _from_object(model, dtype=dtype, device=device, tokenizer=tokenizer)
    name = str(model)
    if name in BUNDLED_MODELS and not Path(name).exists():
        loaded = _from_directory(BUNDLED_MODELS[name], dtype=dtype, device=device)
        loaded.source = f"bundled:{name}"
        return loaded
    if name in PRESETS and not Path(name).exists():
        return _from_preset(name, dtype=dtype, device=device, seed=seed)
    return _from_directory(Path(name), dtype=dtype, device=device)


def _from_preset(name: str, *, dtype: torch.dtype, device: str | torch.device, seed: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(PRESETS[name])
    with _quiet_transformers():
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Weights are created and initialised directly on the target device: an 8B preset never sits in
    # host memory.
    with torch.device(device), _quiet_transformers():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    if name.endswith("-tiny"):
        return LoadedModel(hf, byte_tokenizer(), f"preset:{name}", "byte-level tokenizer of the tiny presets")
    return LoadedModel(hf, None, f"preset:{name}", "none: random-weight presets of full size carry no tokenizer")


def _from_directory(path: Path, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path.exists():
        presets = ", ".join(preset_names())
        raise ModelNotFoundError(f"{path} does not exist; give a Hugging Face model directory or a preset ({presets}).")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory; give a Hugging Face model directory.")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory.")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no *.safetensors weights; save the model with safe_serialization.")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(
            f"{path}/config.json could not be read by transformers: {_first_line(exc)}"
        ) from None
    check_causal_lm(config)
    # Meta-device init and safetensors mmap: the weights go straight to `device`, with no second
    # full copy in host memory.
    try:
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, attn_implementation="sdpa")
    except ValueError as exc:
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        if "attention implementation" in str(exc):
            raise UnsupportedModelError(
                f"{arch} has no scaled-dot-product attention in transformers, which capture needs; supported "
                f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
            ) from None
        raise UnsupportedModelError(
            f"{arch} in {path} could not be loaded by transformers: {_first_line(exc)}"
        ) from None
    hf.eval()
    tokenizer, note = _directory_tokenizer(path)
    return LoadedModel(hf, tokenizer, str(path.resolve()), note)


def _from_object(model: Any, *, dtype: torch.dtype, device: str | torch.device, tokenizer: Any | None) -> LoadedModel:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelNotFoundError(
            f"build() takes a model directory, a preset name or a transformers model, not {type(model).__name__}."
        )
    check_causal_lm(model.config)
    model = model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
    note = "given with the model" if tokenizer is not None else "none given"
    return LoadedModel(model, tokenizer, "object", note)


def check_causal_lm(config: Any) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(
            f"{type(config).__name__} ({config.model_type}) is not a causal language model; oiv2compile builds "
            f"decoder-only models such as {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _directory_tokenizer(path: Path) -> tuple[Any | None, str]:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).exists() for n in names):
        return None, "none: the model directory has no tokenizer files"
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path), "from the model directory"
    except (ValueError, OSError, KeyError) as exc:
        log.warning("the tokenizer in %s could not be loaded: %s", path, exc)
        return None, f"none: the tokenizer files could not be loaded ({_first_line(exc)})"


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: ids 0-255 are bytes, 256 <s>, 257 </s>, 258 <pad>. Built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _byte_alphabet() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2's table), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers():  # type: ignore[no-untyped-def]
    """transformers logs config warnings (e.g. rope fields of presets) and weight-loading progress bars
    that say nothing to our users."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
