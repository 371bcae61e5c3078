"""Figures and viewers: pure drawing functions that write PNGs or fill matplotlib axes."""
