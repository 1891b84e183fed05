"""Phantom sample data (CT, MR, PET, SPECT, misaligned) for File > Open Sample."""

from __future__ import annotations

import os

from ._layers import FUNCTIONAL, volume_to_layer


def load_phantom():
    """Return the medfuse phantom volumes as napari layer data tuples.

    A broken sample folder (``$MEDFUSE_SAMPLES`` pointing at the wrong place, a partial copy) is a warning and
    the phantom is built in memory instead: File > Open Sample always opens the sample, never a traceback.
    """
    from medfuse.errors import MedfuseError
    from medfuse.phantom import load_samples, make_phantom

    try:
        volumes = load_samples()
    except MedfuseError as exc:
        from napari.utils.notifications import show_warning

        # The fix in terms of what a napari user changed: the folder's own fix names a command to rewrite it.
        fix = ("correct MEDFUSE_SAMPLES (the folder it names) or unset it, and restart napari"
               if os.environ.get("MEDFUSE_SAMPLES") else "run 'make samples' in the medfuse checkout")
        where = f" ({exc.path})" if getattr(exc, "path", None) else ""
        show_warning(f"The sample volumes could not be read: {exc.problem}{where}. The phantom was built in memory "
                     f"instead. To open the files: {fix}.")
        volumes = make_phantom().volumes
    return [volume_to_layer(volume, name=name, overlay=volume.modality in FUNCTIONAL)
            for name, volume in volumes.items()]
