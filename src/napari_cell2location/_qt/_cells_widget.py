"""Cells per spot: nuclei on the histology -> per-spot counts -> ``N_cells_per_location`` for the fit.

Two ways to count, as in issue 4:

* detect nuclei on the Image layer in a worker (tile by tile, progress and Cancel) into an editable
  Points layer; the user adds or deletes points to correct it and counts again. A multiscale image (a
  full-resolution scan) is detected on its finest scale, and by default only in the tiles under the spots
  (the spots counted: in-tissue ones, or the selected ones for the manual protocol), so a 20,000² scan reads
  a few percent of its tiles; the job is the core's :func:`~napari_cell2location.nuclei._fullres.iter_detect_in_spots`;
* the manual protocol of cell2location's documentation: select a handful (10-20) of spots in the spots
  layer and count only those, from detected nuclei or from nuclei the user clicks into an empty layer.

Coordinates (DESIGN.md rule 7): the nuclei layer lives in **world** coordinates (full-resolution pixels as
(row, col), as the spots). Detection runs in image pixels and its centres go through the Image layer's
data -> world transform (for a ``hires`` image that is ``scale = 1 / scalef``); spots go through the spots
layer's transform, their radius is half the point size times that layer's scale. Counting happens in
world coordinates, so it is right at every image scale and for sections placed side by side.

Visium HD bins are counted as the squares they are drawn as (side = the point size, ``bin_side_fullres``
full-resolution pixels), each nucleus in the one bin holding its centre; detection under them reads the tiles
under the squares, and µm per world unit come from the bin size (``bin_size_um``) instead of the 55 µm spot.

This module is the tab and its detection side; the geometry glue and the count half (count per spot, colours,
histogram, hand-over to Fit) are :mod:`._cells_count`.
"""

import logging

import napari.layers
import napari.viewer
import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton

from ._cells_count import (
    COUNT_FEATURE,
    SCOPE_ALL,
    SCOPE_SELECTED,
    SpotCounting,
    _linear_scale,
    data_to_world_matrix,
    spot_geometry,
    spot_shape_of,
    spot_size_um,
    spot_word,
    to_world,
)
from ._mpl import MplCanvas
from ._notify import tell
from ._state import SharedState, context_of, state_of
from ._worker import cancel_worker, log_failure, start_worker

logger = logging.getLogger(__name__)

__all__ = [
    "AREA_ALL",
    "AREA_SPOTS",
    "COUNT_FEATURE",
    "SCOPE_ALL",
    "SCOPE_SELECTED",
    "CellsPerSpotWidget",
    "data_to_world_matrix",
    "spot_geometry",
    "spot_shape_of",
    "to_world",
]

AREA_SPOTS = "under the counted spots"
AREA_ALL = "the whole image"
#: an image with more pixels than this (or multiscale) is detected under the spots by default
LARGE_IMAGE_PX = 50_000_000
#: a nucleus must span at least this many image pixels to be detected (below, neighbours merge into one
#: blur: on Visium's lowres / hires PNGs of a whole slide, 10-18 µm/px, nuclei are a fraction of a pixel)
MIN_NUCLEUS_PX = 2.0
_READY = "pick the histology image and the spots"


def _image_array(layer):
    """The finest scale of an Image layer's data (the data itself when it is not multiscale)."""
    return layer.data[0] if layer.multiscale else layer.data


def _is_large(layer) -> bool:
    """Whether detection should default to the tiles under the spots: a multiscale or very large image."""
    shape = _image_array(layer).shape
    return bool(layer.multiscale) or int(shape[0]) * int(shape[1]) > LARGE_IMAGE_PX


def _finest_first(layers: list) -> list:
    """Image layers ordered by their pixel size in world units, finest first (a full-resolution scan before
    a hires PNG of the same section); ties keep their order."""
    return sorted(layers, key=_linear_scale)


def _file_pixel_size(layer) -> float | None:
    """µm per finest-scale pixel that the image file says (the reader puts it in the layer's metadata)."""
    value = layer.metadata.get("pixel_size_um") if isinstance(layer.metadata, dict) else None
    return float(value) if value else None


def _is_spot_layer(layer) -> bool:
    return isinstance(layer, napari.layers.Points) and context_of(layer) is not None


class CellsPerSpotWidget(SpotCounting, Container):
    """Count nuclei per spot on the histology and set ``N_cells_per_location`` of the fit from them.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer with the histology Image layer and the spots Points layer.
    state : SharedState, optional
        Where the chosen N_cells_per_location goes (default: the viewer's); the Fit tab listens to it.

    Attributes
    ----------
    nuclei_layer : napari.layers.Points or None
        The (editable) nuclei layer counted, world coordinates.
    counts : numpy.ndarray or None
        (n_spots,) nuclei per spot of the last count (NaN for spots not counted).
    estimate : napari_cell2location.nuclei.NCellsEstimate or None
        The suggested ``N_cells_per_location`` and its spread.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.state = state if state is not None else state_of(napari_viewer)
        self.worker = None
        self.nuclei_layer = None
        self.counts = None
        self.counted = None
        self.estimate = None
        self._detect_image = None
        self.chunk_size = 1024  # detection tile (px); a 20,000² H&E runs as ~400 tiles, one in memory at a time

        self.image = ComboBox(label="histology", choices=self._image_choices, nullable=True)
        self.spots = ComboBox(label="spots", choices=self._spot_choices, nullable=True)
        self.pixel_size = FloatSpinBox(label="µm / image px", value=0.0, min=0.0, max=1000.0, step=0.1)
        self.pixel_size.native.setDecimals(3)
        self.pixel_size.tooltip = (
            "0 = from the spot size (Visium spots are 55 µm across; Visium HD bins, their bin size)"
        )
        self.pixel_note = Label(label="", value="")
        self.nucleus_diameter = FloatSpinBox(label="nucleus Ø (µm)", value=7.0, min=1.0, max=50.0, step=0.5)
        self.nucleus_diameter.tooltip = (
            "the typical nucleus size; set it to that or a little below: too large merges neighbours "
            "(touching nuclei are split by the outline's lobes, at this scale)"
        )
        self.nucleus_diameter.changed.connect(self._update_pixel_note)
        self.area = ComboBox(label="detect in", choices=[AREA_SPOTS, AREA_ALL], value=AREA_ALL)
        self.area.tooltip = (
            "under the counted spots: only the image tiles that meet a spot (plus a margin) are read; "
            "the default for multiscale and very large images"
        )
        self.detect_button = PushButton(text="Detect nuclei")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="", value=_READY)
        self.nuclei = ComboBox(label="nuclei layer", choices=self._nuclei_choices, nullable=True)
        self.new_layer_button = PushButton(text="New empty layer to click nuclei")
        self.scope = ComboBox(label="count in", choices=[SCOPE_ALL, SCOPE_SELECTED], value=SCOPE_ALL)
        self.scope.tooltip = "manual protocol: select 10-20 spots in the spots layer (select mode, shift-click)"
        self.count_button = PushButton(text="Count nuclei per spot")
        self.summary = Label(label="", value="")
        self.plot = MplCanvas(height=2.0, placeholder="the histogram of nuclei per spot appears here after counting")
        self.use_mean_button = PushButton(text="Use mean for the fit", enabled=False)
        self.use_per_spot_button = PushButton(text="Use per-spot counts for the fit", enabled=False)
        for label in (self.pixel_note, self.status, self.summary):
            label.native.setWordWrap(True)  # long notes wrap instead of widening the dock
        detect_row = Container(widgets=[self.detect_button, self.cancel_button], layout="horizontal", labels=False)
        use_row = Container(widgets=[self.use_mean_button, self.use_per_spot_button], layout="horizontal", labels=False)
        self.extend(
            [
                self.image, self.spots, self.pixel_size, self.pixel_note, self.nucleus_diameter, self.area, detect_row,
                self.progress, self.status, self.nuclei, self.new_layer_button, self.scope, self.count_button,
                self.summary, self.plot, use_row,
            ]
        )  # fmt: skip
        self.detect_button.changed.connect(self.detect)
        self.cancel_button.changed.connect(self.cancel)
        self.new_layer_button.changed.connect(self.new_nuclei_layer)
        self.count_button.changed.connect(self.count)
        self.use_mean_button.changed.connect(self.use_mean)
        self.use_per_spot_button.changed.connect(self.use_per_spot)
        self.image.changed.connect(self._update_pixel_note)
        self.image.changed.connect(self._default_area)
        self.spots.changed.connect(self._update_pixel_note)
        self.pixel_size.changed.connect(self._update_pixel_note)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._refresh)
        self._refresh()
        self._default_area()

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)]

    def _spot_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if _is_spot_layer(layer)]

    def _nuclei_choices(self, _widget=None):
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, napari.layers.Points) and not _is_spot_layer(layer)
        ]

    def _refresh(self, _event=None):
        if self.nuclei_layer is not None and self.nuclei_layer not in self.viewer.layers:
            self.nuclei_layer = None
        images = _finest_first([layer for _, layer in self._image_choices()])
        spots = [layer for _, layer in self._spot_choices()]
        defaults = (
            (self.image, images[0] if images else None),
            (self.spots, self.state.spots_layer if self.state.spots_layer in spots else (spots or [None])[-1]),
            (self.nuclei, self.nuclei_layer),
        )
        for combo, default in defaults:
            current = combo.value
            combo.reset_choices()
            valid = [layer for layer in combo.choices if layer is not None]
            if current is not None and any(current is layer for layer in valid):
                combo.value = current
            elif default is not None and any(default is layer for layer in valid):
                combo.value = default
        self._update_pixel_note()

    def _default_area(self, _value=None):
        """Detect under the spots on a multiscale or very large image, on the whole image otherwise."""
        image = self.image.value
        if image is not None:
            self.area.value = AREA_SPOTS if _is_large(image) else AREA_ALL

    # ------------------------------------------------------------------ pixel size
    def um_per_world(self) -> float | None:
        """µm per world unit, from the spot size (Visium spots are 55 µm across; Visium HD bins are their
        ``bin_size_um`` on a side); None without spots (or bins of unknown size)."""
        layer = self.spots.value
        if layer is None or len(layer.data) == 0:
            return None
        size_um = spot_size_um(layer)
        if size_um is None:
            return None
        _, radius = spot_geometry(layer)
        diameter = float(np.median(2.0 * radius))
        return size_um / diameter if diameter > 0 else None

    def pixel_size_um(self) -> float | None:
        """µm per pixel of the image's finest scale: the spin box when set, else from the spot size and the
        image's scale, else what the image file says (``metadata['pixel_size_um']``)."""
        if self.pixel_size.value > 0:
            return float(self.pixel_size.value)
        image = self.image.value
        if image is None:
            return None
        per_world = self.um_per_world()
        if per_world is None:
            return _file_pixel_size(image)
        return per_world * _linear_scale(image)

    def _pixel_source(self) -> str:
        if self.pixel_size.value > 0:
            return "typed"
        if self.um_per_world() is None:
            return "from the image file"
        layer = self.spots.value
        return f"from the {spot_size_um(layer):g} µm {spot_word(spot_shape_of(layer))} size"

    def unresolved(self) -> str | None:
        """Why nuclei cannot be detected on the chosen image at its pixel size (None when they can)."""
        px = self.pixel_size_um()
        if px is None:
            return None
        across = float(self.nucleus_diameter.value) / px
        if across >= MIN_NUCLEUS_PX:
            return None
        return (
            f"At {px:.3g} µm/px a {self.nucleus_diameter.value:g} µm nucleus is {across:.2g} px across: nuclei "
            "cannot be told apart on this image. Open the full-resolution scan (the TIFF given to Space Ranger "
            "with --image: open it with the folder, or drop it onto the section), or type N cells / spot in "
            "the Fit tab."
        )

    def _update_pixel_note(self, _value=None):
        px = self.pixel_size_um()
        image = self.image.value
        if px is None or image is None:
            self.pixel_note.value = "pixel size: pick an image and spots (or type it)"
            return
        if self.status.value == _READY and self.spots.value is not None:
            self.status.value = "ready: Detect nuclei, or add an empty layer and click nuclei by hand"
        note = f"{px:.3g} µm/px ({self._pixel_source()})"
        if image.multiscale:
            h, w = _image_array(image).shape[:2]
            note += f"; detects on the finest of {len(image.data)} scales, {w:,} x {h:,} px"
        filed = _file_pixel_size(image)
        if filed is not None and self._pixel_source() != "from the image file" and abs(filed / px - 1) > 0.1:
            note += f" (the file says {filed:.3g} µm/px)"
        why = self.unresolved()
        self.detect_button.enabled = why is None and not self.running
        self.pixel_note.value = note if why is None else f"{note}. {why}"

    # ------------------------------------------------------------------ detection
    @property
    def running(self) -> bool:
        return self.worker is not None

    def detect(self, _value=None):
        """Detect nuclei on the chosen Image layer (its finest scale) in a worker, under the counted spots or
        on the whole image (``area``); the result becomes the nuclei layer."""
        from ..nuclei._fullres import iter_detect_in_spots

        if self.running:
            return None
        image = self.image.value
        if image is None:
            tell("error", "Choose the histology image first.", "", self.status)
            return None
        px = self.pixel_size_um()
        if px is None:
            tell(
                "error", "The pixel size is unknown.", "Choose the spots layer, or type the µm per pixel.", self.status
            )
            return None
        why = self.unresolved()
        if why is not None:
            tell("error", "Nuclei are not resolved on this image.", why, self.status)
            return None
        data = _image_array(image)
        if image.ndim != 2:
            tell("error", "Not a 2-D image.", f"{image.name!r} has {image.ndim} dimensions.", self.status)
            return None
        spots = self._detection_spots()
        if spots is False:
            return None
        centres, radius = spots if spots is not None else (None, None)
        kind = "he" if image.rgb else "fluorescence"
        self._detect_image = image
        self.progress.value = 0
        self.progress.max = 1
        shape = spot_shape_of(self.spots.value) if self.spots.value is not None else "circle"
        where = (
            "the whole image" if self.area.value == AREA_ALL else f"the tiles under {len(centres)} {spot_word(shape)}s"
        )
        self.status.value = (
            f"detecting nuclei ({'H&E' if kind == 'he' else 'fluorescence'}, {px:.3g} µm/px) in {where}..."
        )
        start_worker(
            self,
            iter_detect_in_spots,
            data,
            spots=centres,
            spot_radius=radius,
            image_to_world=data_to_world_matrix(image),
            whole_image=self.area.value == AREA_ALL,
            pixel_size_um=px,
            kind=kind,
            nucleus_diameter_um=float(self.nucleus_diameter.value),
            channel_axis=-1 if image.rgb else None,
            chunk_size=int(self.chunk_size),
            spot_shape=shape,
            on_yielded=self._on_progress,
            on_returned=self._on_detected,
        )
        self.detect_button.enabled = False
        self.cancel_button.enabled = True
        self.worker.start()
        return self.worker

    def _detection_spots(self):
        """World centres and radii of the spots to detect under (``area``); None for the whole image; False
        (after a notification) when they cannot be told."""
        if self.area.value == AREA_ALL:
            return None
        spots = self.spots.value
        if spots is None or len(spots.data) == 0:
            tell("error", "Choose the spots layer first.", "Or detect in the whole image.", self.status)
            return False
        mask = self._counted_mask(spots)
        if mask is None:
            return False
        centres, radius = spot_geometry(spots)
        return centres[mask], radius[mask]

    def cancel(self, _value=None):
        """Stop the detection after the current tile."""
        cancel_worker(self)

    def _on_progress(self, p):
        self.progress.max = max(int(p.total), 1)
        self.progress.value = int(p.tile)
        self.status.value = f"tile {p.tile}/{p.total}: {p.n_candidates} candidates, {p.elapsed_s:.1f} s"

    def _on_detected(self, found):
        image = self._detect_image
        table, world = found.table, found.world
        size = float(self.nucleus_diameter.value) / (self.um_per_world() or 1.0)
        if self.pixel_size.value > 0:  # typed pixel size: nucleus size through the image's scale
            size = float(self.nucleus_diameter.value) / float(self.pixel_size.value) * _linear_scale(image)
        features = pd.DataFrame({"response": table["response"].to_numpy()})
        if "split" in table:  # centres added where touching nuclei were split apart
            features["split"] = table["split"].to_numpy()
        name = f"nuclei ({image.name})"
        layer = self.nuclei_layer
        if layer is not None and layer in self.viewer.layers and layer.name == name:
            layer.data = world
            layer.features = features
            layer.size = size
        else:
            layer = self.viewer.add_points(
                world, name=name, size=size, features=features, face_color="transparent",
                border_color="#ff8c00", border_width=0.25, border_width_is_relative=True,
            )  # fmt: skip
        layer.current_size = size
        self.nuclei_layer = layer
        self._refresh()
        self.nuclei.value = layer
        n_split = int(table.attrs.get("n_split", 0))
        split = f", {n_split} of them split from touching neighbours" if n_split else ""
        self.status.value = (
            f"{found.summary()}{split} (threshold {table.attrs.get('threshold', float('nan')):.3g}); "
            "edit the layer (add / delete points), then count again"
        )
        if self.spots.value is not None:
            self.count()

    def _on_error(self, err):
        log_failure(logger, "nuclei detection", err)
        tell("error", "Nuclei detection failed.", str(err), self.status)

    def _on_aborted(self):
        tell("warning", "Nuclei detection cancelled.", "No nuclei layer was added.", self.status)

    def _on_finished(self):
        self.worker = None
        self.detect_button.enabled = self.unresolved() is None
        self.cancel_button.enabled = False
