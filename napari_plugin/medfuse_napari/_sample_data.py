"""Phantom sample data (CT, MR, PET, SPECT, misaligned) for File > Open Sample."""

from __future__ import annotations

from ._layers import FUNCTIONAL, volume_to_layer


def load_phantom():
    """Return the medfuse phantom volumes as napari layer data tuples."""
    from medfuse.phantom import load_samples

    layers = []
    for name, volume in load_samples().items():
        layers.append(volume_to_layer(volume, name=name, overlay=volume.modality in FUNCTIONAL))
    return layers
