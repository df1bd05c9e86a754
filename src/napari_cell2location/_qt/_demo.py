"""The GUI demo: the synthetic section in a viewer with the Cell2location dock, ready to press Run."""

import napari.viewer

from ._dock import Cell2locationDock
from ._view import fit_window_to_screen, frame_tissue


def open_demo(
    viewer: napari.viewer.Viewer,
    n_spots: int = 600,
    n_genes: int = 1000,
    n_cell_types: int = 15,
    seed: int = 0,
    fit_settings: dict | None = None,
) -> Cell2locationDock:
    """Add the synthetic section (H&E + spots + bundled signatures) and dock the widgets, Fit tab open;
    the window takes most of the screen and the view is framed on both sections.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Where to show it.
    n_spots, n_genes, n_cell_types, seed : int
        Size of the synthetic section (``datasets.synthetic_visium``).
    fit_settings : dict, optional
        Values for the Fit widget: ``epochs``, ``lr``, ``n_cells``, ``detection_alpha``, ``batch_size``,
        ``device``, ``model`` (widget attribute name -> value).

    Returns
    -------
    Cell2locationDock
    """
    from .._sample_data import synthetic_section_layers

    for data, kwargs, kind in synthetic_section_layers(n_spots, n_genes, n_cell_types, seed=seed):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    dock = Cell2locationDock(viewer)
    viewer.window.add_dock_widget(dock, name="Cell2location", area="right")
    for name, value in (fit_settings or {}).items():
        if value is not None:
            getattr(dock.fit, name).value = value
    dock.show_tab("Fit")
    fit_window_to_screen(viewer)
    frame_tissue(viewer)
    return dock
