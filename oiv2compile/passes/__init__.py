"""FX passes over the exported ATen graph, run before lowering so that every backend sees them."""

from oiv2compile.passes.manager import PassError, PassRecord, run_passes
from oiv2compile.passes.registry import PASSES, pipeline

__all__ = ["PASSES", "PassError", "PassRecord", "pipeline", "run_passes"]
