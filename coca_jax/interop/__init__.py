"""Weights in and out of other frameworks (open_clip)."""
