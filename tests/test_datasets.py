"""The tinycode corpus rules: which files, which split, and the held-out archive."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from oiv2compile import datasets
from oiv2compile.errors import InvalidRequestError

REPO = Path(__file__).resolve().parents[1]


def _fake_corpus(root: Path, n: int = 400) -> None:
    """n small modules in nested packages, plus files the rules must leave out."""
    for i in range(n):
        pkg = root / f"pkg{i % 7}" / f"sub{i % 3}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / f"mod_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    value = {i * 3}\n")
    for skipped in ("site-packages/third.py", "encodings/cp_table.py", "pydoc_data/topics.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("x = 1\n")
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    (root / "empty.py").write_text("\n\n")
    (root / "huge.py").write_text("x = 1\n" * (datasets.MAX_FILE_BYTES // 6 + 1))
    (root / "notes.txt").write_text("not python\n")


def test_split_is_deterministic_and_depends_only_on_the_path(tmp_path):
    _fake_corpus(tmp_path)
    first = datasets.list_corpus(tmp_path)
    assert first == datasets.list_corpus(tmp_path)
    assert len(first) == 400
    paths = {f.path for f in first}
    assert not {"latin1.py", "empty.py", "huge.py", "site-packages/third.py", "encodings/cp_table.py"} & paths
    assert [f.path for f in first] == sorted(paths)

    splits = {f.path: f.split for f in first}
    heldout = [p for p, s in splits.items() if s == "heldout"]
    valid = [p for p, s in splits.items() if s == "valid"]
    assert 0.02 * 400 <= len(heldout) <= 0.09 * 400, len(heldout)
    assert 1 <= len(valid) <= 0.06 * 400, len(valid)

    # More files and a changed file: every other file keeps its split; the digest records the change.
    (tmp_path / "extra").mkdir()
    for i in range(50):
        (tmp_path / "extra" / f"e{i}.py").write_text(f"y = {i}\n")
    victim = first[0].path
    (tmp_path / victim).write_text("changed = True\n")
    second = {f.path: f for f in datasets.list_corpus(tmp_path)}
    assert all(second[p].split == s for p, s in splits.items())
    assert second[victim].sha256 != first[0].sha256
    assert datasets.corpus_digest(first) != datasets.corpus_digest(second.values())
    assert datasets.split_of("pkg0/sub0/mod_0.py") == splits["pkg0/sub0/mod_0.py"]


def test_heldout_archive_round_trip_and_tamper_check(tmp_path):
    root = tmp_path / "corpus"
    _fake_corpus(root, n=120)
    files = datasets.list_corpus(root)
    archive = tmp_path / "heldout.jsonl.xz"
    datasets.write_heldout(archive, root, files)
    items = datasets.read_heldout(archive)
    assert [p for p, _ in items] == [f.path for f in files if f.split == "heldout"]
    assert items[0][1] == (root / items[0][0]).read_text()

    rows = [json.loads(line) for line in lzma.open(archive, "rt")]
    rows[0]["text"] += "# edited\n"
    with lzma.open(archive, "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(InvalidRequestError, match="sha256"):
        datasets.read_heldout(archive)
    (root / files[0].path).write_text("edited = 1\n")
    with pytest.raises(InvalidRequestError, match="differs from the recorded corpus"):
        datasets.read_texts(root, files[:1])


def test_token_windows():
    assert datasets.token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert datasets.token_windows(list(range(10)), 4, max_windows=1) == [[0, 1, 2, 3]]
    assert datasets.token_windows([1], 4) == []
    with pytest.raises(InvalidRequestError):
        datasets.token_windows([1, 2, 3], 1)


def test_training_script_end_to_end_on_a_fake_corpus(tmp_path):
    """A few CPU steps of tools/train_tinycode.py: its recorded split is list_corpus's, the held-out
    archive holds exactly the held-out files, and the outputs load with transformers offline."""
    root = tmp_path / "corpus"
    _fake_corpus(root, n=200)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "train_tinycode.py"), "--out", str(out), "--root", str(root)]
    cmd += ["--device", "cpu", "--models", "tinycode-draft", "--steps", "2", "--batch", "2", "--seq-len", "32"]
    cmd += ["--vocab-size", "300", "--eval-every", "1", "--warmup", "1"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=300)

    record = json.loads((out / "tinycode-draft" / "training_data.json").read_text())
    expected = datasets.list_corpus(root)
    assert [datasets.SourceFile(**f) for f in record["files"]] == expected
    assert record["digest"] == datasets.corpus_digest(expected)
    assert [p for p, _ in datasets.read_heldout(out / "tinycode-heldout.jsonl.xz")] == [
        f.path for f in expected if f.split == "heldout"
    ]
    card = (out / "tinycode-draft" / "README.md").read_text()
    assert "Held-out perplexity" in card and "unigram baseline" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tinycode-draft")
    model = AutoModelForCausalLM.from_pretrained(out / "tinycode-draft")
    assert len(tok) == model.config.vocab_size == 300
    assert tok("def f(x):")["input_ids"][0] == tok.bos_token_id
