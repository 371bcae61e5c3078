"""tfg-nodules: training-free rectified-flow guidance for weakly supervised lung-nodule segmentation."""

__version__ = "0.1.0"
