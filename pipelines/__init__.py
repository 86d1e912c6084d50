"""Pure compute for angiography runs: arrays and metadata in, typed outputs out.

The built-in pipelines are named in ``pipelines.base.BUILTIN`` and each is imported
when first asked for (``get``): importing the package does not pull in torch.
"""

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
