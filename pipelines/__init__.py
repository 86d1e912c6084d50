"""Pure compute for angiography runs: arrays and metadata in, typed outputs out.

Importing the package registers the built-in pipelines (see ``pipelines.base``).
"""

# Importing a module registers its pipelines (explicit, never name scanning).
from pipelines import coronary as _coronary  # noqa: F401  (xa_coronary)
from pipelines import dsa_av as _dsa_av  # noqa: F401  (dsa_av)
from pipelines import dsa_ia as _dsa_ia  # noqa: F401  (dsa_ia)
from pipelines import minip as _minip  # noqa: F401  (minip)
from pipelines import perfusion as _perfusion  # noqa: F401  (dsa_perfusion)
from pipelines import rotational as _rotational  # noqa: F401  (rotational_dla)
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
