"""Train `tinycode` and `tinycode-draft`: small Llama models of Python source, shipped with oiv2compile.

    python tools/train_tinycode.py --out OUT            # on one GPU: a few minutes
    python tools/train_tinycode.py --out OUT --corpus-record oiv2compile/bundled/tinycode/training_data.json

Data: the running interpreter's standard-library *.py files (PSF licence), or those under --root,
listed and split by file (oiv2compile.datasets: by a hash of each path, about 5% held out for the
final figures and 2.5% for validation, which picks the checkpoint). With --corpus-record the file list
of an earlier run is taken instead and every file's sha256 must match, so a run on the same
interpreter reproduces the same data exactly. Tokenizer: byte-level BPE trained with `tokenizers` on
the training files only. Training is seeded (model init, batch sampling); kernels on the GPU are not
bit-deterministic, so a rerun gives close but not identical weights.

Writes OUT/tinycode and OUT/tinycode-draft (Hugging Face directories with a model card each),
OUT/tinycode-heldout.jsonl.xz (the held-out files) and OUT/train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oiv2compile import datasets

EVAL_WINDOW = 1024  # tokens per held-out window, as `oiv2compile eval` scores by default
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef list_files(path):", "class Stack:\n")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    lr: float
    steps: int  # the validation curve of the shipped runs: tinycode overfits after ~1100, the draft later


TINYCODE = ModelSpec("tinycode", 384, 896, 4, 6, 2, lr=2e-3, steps=1200)
TINYCODE_DRAFT = ModelSpec("tinycode-draft", 192, 512, 2, 3, 1, lr=3e-3, steps=2400)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=EVAL_WINDOW
    )


def make_config(spec: ModelSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=EVAL_WINDOW,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_nll(model: Any, windows: torch.Tensor, batch: int, autocast: bool) -> tuple[float, int]:
    """Summed next-token NLL (nats) over positions 1.. of every window, and how many positions."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch):
        x = windows[start : start + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return total, count


def unigram_nll(train: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """Mean NLL of the held-out positions under add-one-smoothed token frequencies of the training data."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[windows[:, 1:].reshape(-1)].mean())


def train_model(
    spec: ModelSpec, tokenizer: Any, train: torch.Tensor, valid: torch.Tensor, args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """Train for args.steps and return the weights of the evaluation with the lowest validation loss."""
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    steps = args.steps or spec.steps
    torch.manual_seed(args.seed)
    config = make_config(spec, tokenizer)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    train_dev = train.to(device)
    seq = args.seq_len
    autocast = device.type == "cuda"
    history = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, spec.lr, args.warmup)
        offsets = torch.randint(0, train.numel() - seq - 1, (args.batch,), generator=gen).to(device)
        idx = offsets[:, None] + torch.arange(seq + 1, device=device)
        chunk = train_dev[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            model.eval()
            nll, n = heldout_nll(model, valid, args.eval_batch, autocast)
            model.train()
            row = {
                "step": step + 1,
                "train_loss": round(float(loss.detach()), 4),
                "valid_ppl": round(math.exp(nll / n), 3),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            history.append(row)
            if best is None or nll / n < best[0]:
                best = (nll / n, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"[{spec.name}] {json.dumps(row)}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert best is not None
    model.load_state_dict(best[2])
    stats = {
        "chosen_step": best[1],
        "steps": steps,
        "batch": args.batch,
        "seq_len": seq,
        "tokens_seen": steps * args.batch * seq,
        "epochs": round(steps * args.batch * seq / train.numel(), 2),
        "peak_lr": spec.lr,
        "precision": "bf16 autocast" if autocast else "fp32",
        "warmup": args.warmup,
        "seconds": round(seconds, 1),
        "history": history,
    }
    return model, stats


def save_and_check(
    spec: ModelSpec,
    model: Any,
    tokenizer: Any,
    out: Path,
    windows: torch.Tensor,
    unigram: float,
    stats: dict[str, Any],
    corpus: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Save in bf16, reload with transformers in fp32 (as `oiv2compile eval`'s reference does), score
    the held-out windows, sample, and write the model card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = out / spec.name
    d.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    (d / "training_data.json").write_text(json.dumps(corpus, indent=1) + "\n")

    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(d)
    nll, n = heldout_nll(ref, windows, args.eval_batch, autocast=False)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok(prompt, return_tensors="pt").to(args.device)
        outs = ref.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
        samples.append({"prompt": prompt, "completion": tok.decode(outs[0, ids["input_ids"].shape[1] :])})
    params = sum(p.numel() for p in ref.parameters())
    result = {
        "name": spec.name,
        "parameters": params,
        "safetensors_bytes": (d / "model.safetensors").stat().st_size,
        "dir_bytes": sum(p.stat().st_size for p in d.iterdir()),
        "heldout_ppl": math.exp(nll / n),
        "heldout_tokens_scored": n,
        "unigram_ppl": math.exp(unigram),
        "train": stats,
        "samples": samples,
        "spec": spec.__dict__,
    }
    (d / "README.md").write_text(model_card(result, corpus, args))
    result["dir_bytes"] = sum(p.stat().st_size for p in d.iterdir())
    return result


def model_card(r: dict[str, Any], corpus: dict[str, Any], args: argparse.Namespace) -> str:
    s, t = r["spec"], r["train"]
    lines = [
        "---",
        "license: psf-2.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, code, python, oiv2compile]",
        "---",
        f"# {r['name']}",
        "",
        f"A {r['parameters'] / 1e6:.2f}M-parameter Llama ({s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads of {s['hidden_size'] // s['num_attention_heads']}, "
        f"{s['num_key_value_heads']} key-value heads, MLP {s['intermediate_size']}, tied embeddings, bf16) trained on Python "
        "source, shipped with oiv2compile for its demo and accuracy checks. It completes Python code; it "
        "knows nothing else.",
        "",
        "## Training data",
        f"The `*.py` files of {corpus['source']}, "
        f"{len(corpus['files'])} files after the rules in `oiv2compile/datasets.py`, split by a hash of each path: "
        f"{corpus['train_files']} training files ({corpus['train_tokens']:,} tokens), {corpus['valid_files']} "
        f"validation files ({corpus['valid_tokens']:,} tokens) that chose the checkpoint, and {corpus['heldout_files']} "
        f"held-out files ({corpus['heldout_tokens']:,} tokens) used only for the figures below. The file list with "
        f"every file's sha256 is in `training_data.json` (corpus digest `{corpus['digest'][:16]}…`). Licence of the "
        "data: PSF License Agreement.",
        "",
        f"Tokenizer: byte-level BPE, {corpus['vocab_size']} tokens, trained with `tokenizers` on the training "
        "files; `<s>` starts every sequence, `</s>` ends each file.",
        "",
        "## Training",
        f"`python tools/train_tinycode.py {shlex.join(sys.argv[1:])}` on {corpus['device']}, "
        f"{t['steps']} steps of {t['batch']} × {t['seq_len']} tokens ({t['tokens_seen'] / 1e6:.0f}M tokens, "
        f"{t['epochs']} epochs), AdamW (β 0.9/0.95, weight decay 0.1), peak learning rate {t['peak_lr']}, "
        f"{t['warmup']} warm-up steps, cosine to 10%, {t['precision']}, {t['seconds']:.0f} s. The weights are "
        f"those of step {t['chosen_step']}, the lowest validation perplexity:",
        "",
        "| step | train loss | validation perplexity |",
        "|---|---|---|",
        *[f"| {h['step']} | {h['train_loss']} | {h['valid_ppl']} |" for h in t["history"]],
        "",
        "## Held-out perplexity",
        f"Over the held-out files in windows of {args.seq_len} tokens, every position after the first, the "
        "saved bf16 weights evaluated in fp32 with transformers:",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| {r['name']} | {r['heldout_ppl']:.3f} |",
        f"| unigram baseline (token frequencies of the training data, add-one) | {r['unigram_ppl']:.1f} |",
        "",
        f"({r['heldout_tokens_scored']:,} tokens scored.)",
        "",
        "## Samples (greedy, 64 new tokens)",
    ]
    for sample in r["samples"]:
        lines += ["", "```python", sample["prompt"] + sample["completion"], "```"]
    lines += [
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "```",
        f"or `oiv2compile build {r['name']} -o out/{r['name']}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--root", type=Path, default=None, help="corpus root (default: this interpreter's stdlib)")
    p.add_argument("--source", default=None, help="what --root is, for the model card (e.g. 'CPython 3.11.7's stdlib')")
    p.add_argument("--corpus-record", type=Path, default=None, help="take the file list of an earlier run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="default: each model's own (1200 / 2400)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=EVAL_WINDOW)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--models", default="tinycode,tinycode-draft")
    args = p.parse_args()

    root = args.root or datasets.stdlib_root()
    files = datasets.list_corpus(root)
    if args.corpus_record:
        recorded = json.loads(args.corpus_record.read_text())
        files = [datasets.SourceFile(**f) for f in recorded["files"]]
    train_files, valid_files, heldout_files = (
        [f for f in files if f.split == s] for s in ("train", "valid", "heldout")
    )
    train_texts = datasets.read_texts(root, train_files)
    valid_texts = datasets.read_texts(root, valid_files)
    heldout_texts = datasets.read_texts(root, heldout_files)
    print(
        f"corpus: {len(train_files)} train, {len(valid_files)} validation, {len(heldout_files)} held-out files from {root}",
        flush=True,
    )

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train = torch.tensor(datasets.token_stream(tokenizer, train_texts), dtype=torch.long)
    heldout = datasets.token_stream(tokenizer, heldout_texts)
    windows = torch.tensor(datasets.token_windows(heldout, args.seq_len), dtype=torch.long)
    valid_stream = datasets.token_stream(tokenizer, valid_texts)
    valid = torch.tensor(datasets.token_windows(valid_stream, args.seq_len), dtype=torch.long)
    print(f"tokenizer and tokens: {time.perf_counter() - t0:.1f} s; {train.numel():,} train tokens", flush=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    corpus = datasets.corpus_record(
        root,
        files,
        source=args.source or f"the standard library of {platform.python_implementation()} {platform.python_version()}",
        train_files=len(train_files),
        valid_files=len(valid_files),
        heldout_files=len(heldout_files),
        train_tokens=train.numel(),
        valid_tokens=len(valid_stream),
        heldout_tokens=len(heldout),
        vocab_size=len(tokenizer),
        device=f"{device_name}, torch {torch.__version__}",
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    datasets.write_heldout(args.out / "tinycode-heldout.jsonl.xz", root, files)
    unigram = unigram_nll(train, windows, len(tokenizer))

    log: dict[str, Any] = {"corpus_digest": corpus["digest"], "args": {k: str(v) for k, v in vars(args).items()}}
    specs = {s.name: s for s in (TINYCODE, TINYCODE_DRAFT)}
    for name in args.models.split(","):
        model, stats = train_model(specs[name], tokenizer, train, valid, args)
        result = save_and_check(specs[name], model, tokenizer, args.out, windows, unigram, stats, corpus, args)
        log[name] = result
        print(
            f"[{name}] params {result['parameters']:,}, dir {result['dir_bytes'] / 1e6:.2f} MB, held-out ppl "
            f"{result['heldout_ppl']:.3f} (unigram {result['unigram_ppl']:.1f}), {stats['seconds']:.0f} s",
            flush=True,
        )
        for s in result["samples"]:
            print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}\n", flush=True)
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
