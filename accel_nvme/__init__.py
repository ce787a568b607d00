"""accel_nvme: an ``"nvme"`` tier for accelerate's ``device_map``, streamed from fast disks.

Importing the package makes ``accelerate.dispatch_model`` (and the copies transformers and diffusers bind) accept
``"nvme"`` values.
"""

from .config import NvmeConfig
from .dispatch import NvmeStats, close, dispatch_model, group_files, stats
from .hooks import NvmeAlignDevicesHook
from .integrations import install, uninstall
from .recasting import recast

__all__ = [
    "NvmeAlignDevicesHook",
    "NvmeConfig",
    "NvmeStats",
    "close",
    "dispatch_model",
    "group_files",
    "install",
    "recast",
    "stats",
    "uninstall",
]
__version__ = "0.1.0"

install()
