"""The tinycode corpus: the Python standard library's source files, split by file into train and held-out.

The split depends only on each file's path relative to the standard-library root (a hash of it), so a
file is in the same split whatever else is in the corpus and whichever interpreter lists it. The
held-out files ship with the bundled tinycode model as one xz-compressed JSON-lines file, each line
with the file's path, sha256 and text, so that `oiv2compile eval` scores the same tokens on any
machine, offline.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oiv2compile.errors import InvalidRequestError

HELDOUT_PER_MILLE = 50  # about 5% of the files, scored only for the final figures
VALID_PER_MILLE = 25  # about 2.5% more, never trained on, that training scores to choose its checkpoint
# Top-level folders left out: third-party packages, codec tables (generated data, not code), and
# pydoc's help-text dump.
EXCLUDED_TOP_LEVEL = ("site-packages", "encodings", "pydoc_data", "__pycache__")
MAX_FILE_BYTES = 256_000  # larger files are generated tables or test data


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the corpus root, with forward slashes
    sha256: str
    bytes: int
    split: str  # "train", "valid" or "heldout"


def stdlib_root() -> Path:
    """Where the running interpreter's pure-Python standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(path: str) -> str:
    """ "heldout", "valid" or "train" for a file, by its path relative to the corpus root alone."""
    bucket = int(hashlib.sha256(f"tinycode-split:{path}".encode()).hexdigest()[:8], 16) % 1000
    if bucket < HELDOUT_PER_MILLE:
        return "heldout"
    return "valid" if bucket < HELDOUT_PER_MILLE + VALID_PER_MILLE else "train"


def list_corpus(root: Path) -> list[SourceFile]:
    """Every *.py file under `root` that the corpus takes, in path order, with its hash and split.

    Files that are not UTF-8, empty, or larger than MAX_FILE_BYTES are left out, as are the folders
    in EXCLUDED_TOP_LEVEL.
    """
    files = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in EXCLUDED_TOP_LEVEL or not file.is_file():
            continue
        data = file.read_bytes()
        if not data.strip() or len(data) > MAX_FILE_BYTES:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(SourceFile(rel, hashlib.sha256(data).hexdigest(), len(data), split_of(rel)))
    return files


def corpus_digest(files: Iterable[SourceFile]) -> str:
    """One hash over the file list: paths, contents' hashes and splits."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\t{f.sha256}\t{f.split}\n".encode())
    return h.hexdigest()


def read_texts(root: Path, files: Sequence[SourceFile]) -> list[str]:
    """The text of each file, checked against its recorded hash."""
    texts = []
    for f in files:
        data = (root / f.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise InvalidRequestError(f"{root / f.path} differs from the recorded corpus (sha256 mismatch).")
        texts.append(data.decode("utf-8"))
    return texts


def corpus_record(root: Path, files: Sequence[SourceFile], **extra: Any) -> dict[str, Any]:
    """The JSON record of a corpus that ships beside a model trained on it."""
    return {
        "root": str(root),
        "digest": corpus_digest(files),
        "heldout_per_mille": HELDOUT_PER_MILLE,
        "valid_per_mille": VALID_PER_MILLE,
        "excluded_top_level": list(EXCLUDED_TOP_LEVEL),
        "max_file_bytes": MAX_FILE_BYTES,
        **extra,
        "files": [asdict(f) for f in files],
    }


def write_heldout(path: Path, root: Path, files: Sequence[SourceFile]) -> None:
    """Write the held-out files' texts as xz-compressed JSON lines."""
    heldout = [f for f in files if f.split == "heldout"]
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as out:
        for f, text in zip(heldout, read_texts(root, heldout), strict=True):
            out.write(json.dumps({"path": f.path, "sha256": f.sha256, "text": text}) + "\n")


def read_heldout(path: Path) -> list[tuple[str, str]]:
    """(path, text) of each held-out file, each checked against its sha256."""
    items = []
    with lzma.open(path, "rt", encoding="utf-8") as src:
        for line in src:
            row = json.loads(line)
            if hashlib.sha256(row["text"].encode()).hexdigest() != row["sha256"]:
                raise InvalidRequestError(f"{path}: the text of {row['path']} does not match its sha256.")
            items.append((row["path"], row["text"]))
    return items


def token_stream(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    """The texts tokenized one by one (the tokenizer adds <s> where it does) and joined, each
    followed by the end-of-sequence token when there is one."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, verbose=False)["input_ids"])  # longer than the model's limit: windows cut it
        if eos is not None:
            stream.append(eos)
    return stream


def token_windows(stream: Sequence[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens over the stream; the last, shorter rest is dropped."""
    if window < 2:
        raise InvalidRequestError(f"The scoring window must hold at least 2 tokens, not {window}.")
    count = len(stream) // window
    if max_windows is not None:
        count = min(count, max_windows)
    return [list(stream[i * window : (i + 1) * window]) for i in range(count)]
