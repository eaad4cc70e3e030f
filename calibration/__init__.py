"""Calibration and hold-out images for the vision encoder, and the builder that cuts them into tiles."""
