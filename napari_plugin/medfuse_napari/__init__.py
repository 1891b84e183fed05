"""napari plugin for medfuse: readers and sample data (thin layer over ``medfuse``)."""

__all__ = ["napari_get_reader", "load_phantom"]

from ._reader import napari_get_reader
from ._sample_data import load_phantom
