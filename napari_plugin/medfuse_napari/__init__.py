"""napari plugin for medfuse: reader, sample data and the "medfuse" dock widget (a thin layer over ``medfuse``).

The widget module imports Qt, so it is only loaded when napari asks for it (``medfuse_napari._widget``).
"""

__all__ = ["napari_get_reader", "load_phantom"]

from ._reader import napari_get_reader
from ._sample_data import load_phantom
