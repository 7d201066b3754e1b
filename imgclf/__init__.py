"""Shared code of the image-classification pipeline."""
