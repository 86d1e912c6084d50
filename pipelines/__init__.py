"""Pure compute for angiography runs: arrays and metadata in, typed outputs out.

Importing the package registers the built-in pipelines (see ``pipelines.base``).
"""

from pipelines import minip as _minip  # noqa: F401  (registers "minip")
from pipelines.base import (
    PipelineContext,
    PipelineError,
    PipelineResult,
    Run,
    RunMeta,
    get,
    names,
    register,
)

__all__ = [
    "PipelineContext",
    "PipelineError",
    "PipelineResult",
    "Run",
    "RunMeta",
    "get",
    "names",
    "register",
]
