"""Layers and conversions shared by every technique (`fuse`: BatchNorm folded for deploy forms)."""
