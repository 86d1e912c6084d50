"""Pure compute for angiography runs: arrays and metadata in, typed outputs out.

The built-in pipelines are named in ``pipelines.base.BUILTIN`` and imported when
first asked for (``get``), or all at once (``load_builtin``): importing the package
does not pull in torch.
"""

from pipelines.base import (
    PipelineContext,
    PipelineError,
    PipelineResult,
    Run,
    RunMeta,
    get,
    load_builtin,
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
    "load_builtin",
    "names",
    "register",
]
