"""tfg-nodules: training-free rectified-flow guidance for weakly supervised lung-nodule segmentation."""

from tfg_core._deferred_imports import defer_rfc3987_syntax

__version__ = "0.1.0"

defer_rfc3987_syntax()  # ~4 s of every process start (see the module), before anything imports MONAI
