"""STAR video super-resolution: a clean torch implementation of the official I2VGen-XL based model.

This package never imports ComfyUI; hosts inject what they own (operations, attention, progress, device).
"""

__version__ = "0.1.0"
