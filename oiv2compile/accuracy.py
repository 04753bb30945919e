"""`oiv2compile eval`: how closely an artifact follows the Hugging Face model it was built from.

Both score the same tokens: held-out text tokenized with the artifact's tokenizer, cut into
non-overlapping windows, every position after a window's first one predicted with the true tokens
before it (teacher forcing, so one different prediction does not change what follows). The
artifact runs its own programs and CUDA graphs (Engine.score); the reference is the source model in
float32 through transformers, on the same device. Reported: both perplexities and their relative
difference, and the share of positions where the artifact's most likely next token is the reference's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oiv2compile import datasets
from oiv2compile.errors import InvalidRequestError
from oiv2compile.models import TINYCODE_HELDOUT, bundled_model_dir

DEFAULT_WINDOW = 1024
# Logits of the reference held at once: windows per forward pass are chosen to stay under this.
_REFERENCE_LOGIT_BYTES = 1 << 29


def evaluate(
    artifact: str | Path,
    *,
    data: str | Path | None = None,
    reference: str | Path | None = None,
    window: int | None = None,
    max_windows: int | None = None,
    device: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Score `artifact` and its reference model on held-out text; returns the JSON-ready report.

    data: a directory (its *.py files), a text file, or a held-out archive (*.jsonl.xz); by default
    the held-out files of the tinycode corpus, for artifacts of the bundled models.
    reference: a Hugging Face model directory; by default the directory the artifact was built from.
    """
    from oiv2compile.api import load, transformers_version

    artifact = Path(artifact)
    engine = load(artifact, device=device)
    manifest = engine.manifest
    if engine.tokenizer is None:
        raise InvalidRequestError(f"{artifact} has no tokenizer, so it cannot tokenize text to evaluate on.")
    source = manifest["model"]["source"]
    ref_dir = _reference_dir(source, reference)
    data_name, texts = _eval_texts(source, data)
    stream = datasets.token_stream(engine.tokenizer, texts)
    width = window or min(DEFAULT_WINDOW, engine.max_seq_len + 1)
    if width - 1 > engine.max_seq_len:
        raise InvalidRequestError(
            f"--window {width} needs {width - 1} cache positions but the artifact holds {engine.max_seq_len}."
        )
    windows = datasets.token_windows(stream, width, max_windows)
    if not windows:
        raise InvalidRequestError(f"{data_name} has {len(stream)} tokens, fewer than one window of {width}.")

    def report(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(stage, done, total)) if progress else None

    start = time.perf_counter()
    art_nll, art_top = engine.score(windows, report("artifact"))
    art_seconds = time.perf_counter() - start
    run_device = engine.device
    del engine
    if run_device.type == "cuda":
        torch.cuda.empty_cache()

    start = time.perf_counter()
    ref_nll, ref_top = _reference_scores(ref_dir, windows, run_device, report("reference"))
    ref_seconds = time.perf_counter() - start

    targets = torch.tensor(windows, dtype=torch.long)[:, 1:]
    positions = targets.numel()
    ppl_art = math.exp(float(art_nll.sum()) / positions)
    ppl_ref = math.exp(float(ref_nll.sum()) / positions)
    cfg = manifest["build_config"]
    return {
        "artifact": {
            "path": str(artifact),
            "source": source,
            "backend": cfg["backend"],
            "dtype": cfg["dtype"],
            "quantization": manifest.get("quantization"),
            "device": str(run_device),
            "device_name": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else "cpu",
        },
        "reference": {"path": str(ref_dir), "dtype": "float32", "device": str(run_device)},
        "data": {
            "source": data_name,
            "files": len(texts),
            "tokens": len(stream),
            "window": width,
            "windows": len(windows),
            "positions_scored": positions,
        },
        "perplexity": {
            "artifact": ppl_art,
            "reference": ppl_ref,
            "relative_difference": ppl_art / ppl_ref - 1.0,
        },
        "next_token_agreement": float((art_top == ref_top).double().mean()),
        "top1_accuracy": {
            "artifact": float((art_top == targets).double().mean()),
            "reference": float((ref_top == targets).double().mean()),
        },
        "seconds": {"artifact": round(art_seconds, 2), "reference": round(ref_seconds, 2)},
        "versions": {"torch": torch.__version__, "transformers": transformers_version()},
    }


def summary(result: dict[str, Any]) -> str:
    """The one-line summary of an evaluate() report."""
    a, p, d = result["artifact"], result["perplexity"], result["data"]
    return (
        f"{Path(a['path']).name} ({a['dtype']}, {a['backend']}, {a['device']}): perplexity {p['artifact']:.4f} vs "
        f"reference fp32 {p['reference']:.4f} ({p['relative_difference'] * 100:+.3f}%), next-token agreement "
        f"{result['next_token_agreement'] * 100:.2f}% over {d['positions_scored']:,} positions "
        f"({d['windows']} windows of {d['window']} tokens from {d['source']})"
    )


def _reference_dir(source: str, reference: str | Path | None) -> Path:
    if reference is not None:
        path = Path(reference)
        if not (path / "config.json").is_file():
            raise InvalidRequestError(f"--reference {path} is not a Hugging Face model directory (no config.json).")
        return path
    bundled = bundled_model_dir(source)
    if bundled is not None:
        return bundled
    path = Path(source)  # a directory build() read the model from; "preset:…" and "object" are none
    if (path / "config.json").is_file():
        return path
    raise InvalidRequestError(
        f"The artifact was built from {source}, whose weights are not in a model directory here; give the "
        "reference model with --reference DIR (random-weight presets have no reference to compare with)."
    )


def _eval_texts(source: str, data: str | Path | None) -> tuple[str, list[str]]:
    if data is None:
        if bundled_model_dir(source) is None:
            raise InvalidRequestError(
                "Give the text to evaluate on with --data (a directory of .py files, a text file, or a .jsonl.xz "
                "held-out archive); only artifacts of the bundled tinycode models have default data."
            )
        data = TINYCODE_HELDOUT
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.py") if p.is_file())
        if not files:
            raise InvalidRequestError(f"{path} has no .py files to evaluate on.")
        return str(path), [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if not path.is_file():
        raise InvalidRequestError(f"--data {path} does not exist.")
    if path.name.endswith(".jsonl.xz"):
        items = datasets.read_heldout(path)
        name = "the tinycode held-out files" if path == TINYCODE_HELDOUT else str(path)
        return name, [text for _, text in items]
    return str(path), [path.read_text(encoding="utf-8", errors="replace")]


@torch.no_grad()
def _reference_scores(
    ref_dir: Path, windows: list[list[int]], device: torch.device, progress: Callable[[int, int], None] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from oiv2compile.models import _quiet_transformers

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).eval()  # type: ignore[arg-type]
    width = len(windows[0])
    per_pass = max(1, _REFERENCE_LOGIT_BYTES // (width * model.config.vocab_size * 4))
    ids = torch.tensor(windows, dtype=torch.long)
    nll_rows, top_rows = [], []
    for start in range(0, len(ids), per_pass):
        x = ids[start : start + per_pass].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nll_rows.append(-logp.gather(2, x[:, 1:, None])[..., 0].double().cpu())
        top_rows.append(logits.argmax(dim=-1).cpu())
        del logits, logp
        if progress is not None:
            progress(min(start + per_pass, len(ids)), len(ids))
    return torch.cat(nll_rows), torch.cat(top_rows)
