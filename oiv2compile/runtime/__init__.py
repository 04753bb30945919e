"""The artifact format, the loader's checks, and the executor that generates tokens."""

from oiv2compile.runtime.engine import Engine, GenerationResult, StreamToken

__all__ = ["Engine", "GenerationResult", "StreamToken"]
