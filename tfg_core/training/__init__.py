"""Weak-label fine-tuning of the 2.5D slice classifiers."""
