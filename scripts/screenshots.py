"""Generate the README screenshots of the medfuse napari plugin into ``docs/images/``.

Run headless (CI, servers) under a virtual X server::

    xvfb-run -a -s "-screen 0 1280x1024x24" python scripts/screenshots.py [--out docs/images] [--overwrite]

It opens the phantom sample data, registers PET to MR through the dock widget (waiting on its worker),
then saves:

* ``napari_pet_mr.png``: the whole window, PET (resampled onto the MR) over the T1 MR, with the widget's report;
* ``napari_pet_ct.png``: the canvas, PET over CT with the brain window, centred on the lesion;
* ``napari_checkerboard.png``: the canvas in checkerboard compare mode (MR tiles / PET tiles).

PNGs are palette-quantised to stay small (a few hundred KB at most) and written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_WIDTH = 1100  # px; README images are shown at about this width


def _save_png(array: np.ndarray, path: Path, *, overwrite: bool) -> Path:
    from PIL import Image

    from medfuse.io._atomic import atomic_path

    img = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
    if img.width > MAX_WIDTH:
        img = img.resize((MAX_WIDTH, round(img.height * MAX_WIDTH / img.width)), Image.LANCZOS)
    img = img.quantize(colors=192, method=Image.MEDIANCUT)  # why: keeps each file well under 300 KB
    with atomic_path(path, overwrite=overwrite) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path


def _wait(app, predicate, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("the registration worker did not finish in time")
        time.sleep(0.02)


def _close_toasts(viewer) -> None:
    """Close napari's pop-up notifications (e.g. the PyQt5 deprecation notice) so they stay out of the images."""
    from qtpy.QtWidgets import QWidget

    for w in viewer.window._qt_window.findChildren(QWidget):
        if type(w).__name__ == "NapariQtNotification":
            w.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--overwrite", action="store_true", help="replace existing screenshots")
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from medfuse.phantom import load_ground_truth
    from medfuse_napari._sample_data import load_phantom
    from medfuse_napari._widget import MedfuseWidget

    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="medfuse")
    viewer.window.resize(1400, 860)
    for data, kwargs, _ in load_phantom():
        viewer.add_image(data, **kwargs)
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse", area="right")
    app = QApplication.instance()

    reg = widget.register_panel
    reg.fixed.set_layer("t1")
    reg.moving.set_layer("pet")
    reg.resample_box.setChecked(True)
    reg.run()
    _wait(app, lambda: reg.worker is None, 300)
    if reg.result is None:
        print("registration failed: see the notification", file=sys.stderr)
        return 1

    gt = load_ground_truth()
    centre = gt["lesion"]["center_lps_mm"][::-1]  # LPS -> napari (S, P, L)
    ov = widget.overlay_panel
    ov.overlay.set_layer("pet on t1")
    ov.set_suv_range(12.0, 3.0)  # threshold at white-matter uptake: grey matter and the lesion stand out
    ov.opacity.setValue(80)

    def focus(visible):
        for layer in viewer.layers:
            layer.visible = layer.name in visible
        viewer.reset_view()
        viewer.dims.set_point(0, float(centre[0]))
        _close_toasts(viewer)
        app.processEvents()

    written = []
    ov.base.set_layer("t1")
    focus(("t1", "pet on t1"))
    written.append(_save_png(viewer.screenshot(canvas_only=False, flash=False), args.out / "napari_pet_mr.png",
                             overwrite=args.overwrite))
    ov.base.set_layer("ct")
    ov.set_window("brain")
    focus(("ct", "pet on t1"))
    viewer.camera.center = tuple(float(c) for c in centre / 2)  # between the head's centre and the lesion
    viewer.camera.zoom *= 1.3
    written.append(_save_png(viewer.screenshot(canvas_only=True, flash=False), args.out / "napari_pet_ct.png",
                             overwrite=args.overwrite))
    ov.base.set_layer("t1")
    focus(("t1", "pet on t1"))
    ov.compare.setCurrentText("checkerboard")
    app.processEvents()
    written.append(_save_png(viewer.screenshot(canvas_only=True, flash=False), args.out / "napari_checkerboard.png",
                             overwrite=args.overwrite))
    ov.compare.setCurrentText("overlay")
    for p in written:
        print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  {p.stat().st_size / 1024:.0f} KB")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
