"""Pure compute for angiography runs: arrays and metadata in, typed outputs out.

Importing the package registers the built-in pipelines (see ``pipelines.base``).
"""

from pipelines import coronary as _coronary  # noqa: F401  (xa_coronary, rotational_dla)
from pipelines import dsa_av as _dsa_av  # noqa: F401  (dsa_av, dsa_ia)
from pipelines import dsa_ia as _dsa_ia
from pipelines import minip as _minip  # noqa: F401  (registers "minip")
from pipelines import perfusion as _perfusion  # noqa: F401  (registers "dsa_perfusion")
from pipelines import rotational as _rotational
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
