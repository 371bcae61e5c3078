"""Readers, ground truth, preprocessing and the phantom cohort: everything that turns CT files into model inputs."""

from tfg_core.data.volume import Volume

__all__ = ["Volume"]
