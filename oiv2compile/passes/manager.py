"""The pass manager: runs an ordered list of passes over one graph, cleans up after each, and
reports what each did.

Each pass has the signature `name(gm, cfg) -> int` and rewrites `gm` in place. After each pass the
manager removes dead code, lints the graph and recompiles it. With OIV2_DUMP_DIR set, the graph is
written before and after each pass as `<label>.<NN>.<pass>.{before,after}.txt`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch.fx import GraphModule

from oiv2compile.config import BuildConfig
from oiv2compile.errors import Oiv2Error
from oiv2compile.passes.registry import Pass

log = logging.getLogger(__name__)

DUMP_ENV = "OIV2_DUMP_DIR"


class PassError(RuntimeError):
    """A pass raised; the message names the pass and the graph."""


@dataclass(frozen=True)
class PassRecord:
    name: str
    count: int
    ms: float


def run_passes(gm: GraphModule, cfg: BuildConfig, passes: list[Pass], *, label: str) -> list[PassRecord]:
    dump_dir = os.environ.get(DUMP_ENV)
    records = []
    for i, fn in enumerate(passes):
        name = fn.__name__
        _dump(dump_dir, f"{label}.{i:02d}.{name}.before.txt", gm)
        start = time.perf_counter()
        try:
            count = fn(gm, cfg)
            cleanup(gm)
        except Oiv2Error:
            raise  # a user-facing refusal (a model this option cannot apply to) says so itself
        except Exception as exc:
            raise PassError(f"pass {name} failed on the {label} graph: {exc}") from exc
        ms = (time.perf_counter() - start) * 1e3
        _dump(dump_dir, f"{label}.{i:02d}.{name}.after.txt", gm)
        log.debug("%s: %s made %d rewrites in %.1f ms", label, name, count, ms)
        records.append(PassRecord(name, count, ms))
    return records


def cleanup(gm: GraphModule) -> None:
    """Dead code out (mutating ops such as oiv2::kv_write are impure and stay), lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _dump(dump_dir: str | None, name: str, gm: GraphModule) -> None:
    if not dump_dir:
        return
    path = Path(dump_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(gm.print_readable(print_output=False))
