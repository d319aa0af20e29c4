"""Distillery: distil frozen vision foundation models into real-time DETR detectors on Ray."""

__version__ = "0.1.0"
