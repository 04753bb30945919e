"""oiv2compile: compile Hugging Face causal language models into artifacts that load fast and run fast.

import oiv2compile
oiv2compile.build("llama-tiny", "out/llama-tiny")
engine = oiv2compile.load("out/llama-tiny")
print(engine.generate(["def add(a, b):"], max_new_tokens=16)[0].text)
"""

__version__ = "0.1.0"

from oiv2compile.api import build, load
from oiv2compile.config import Backend, BuildConfig, Device, DType
from oiv2compile.errors import (
    ArtifactError,
    BuildError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    Oiv2Error,
    UnsupportedModelError,
)

__all__ = [
    "ArtifactError",
    "Backend",
    "BuildConfig",
    "BuildError",
    "ConfigError",
    "DType",
    "Device",
    "InvalidRequestError",
    "ModelNotFoundError",
    "Oiv2Error",
    "UnsupportedModelError",
    "__version__",
    "build",
    "load",
]
