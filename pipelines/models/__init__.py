"""Network architectures of the pipelines and the model package format.

Importing this package registers the built-in architectures with
``pipelines.models.package``; add one import line per architecture module.
"""

from pipelines.models import cenet as _cenet  # noqa: F401  (ce_net_3d2d)
from pipelines.models import dla as _dla  # noqa: F401  (dla_resnet)
from pipelines.models import ica_unet as _ica_unet  # noqa: F401  (ica_unet)
from pipelines.models import stunet as _stunet  # noqa: F401  (st_unet)
from pipelines.models import vssnet as _vssnet  # noqa: F401  (vss_net)
