"""npe2 sample data: the synthetic Visium section (H&E, spots, counts, reference signatures), no files needed."""

from __future__ import annotations


def synthetic_section_layers(
    n_spots: int = 600, n_genes: int = 1000, n_cell_types: int = 15, seed: int = 0, name: str = "synthetic section"
) -> list[tuple]:
    """Layer data of :func:`napari_cell2location.datasets.synthetic_visium`.

    Parameters
    ----------
    n_spots, n_genes, n_cell_types, seed
        Passed to ``synthetic_visium``.
    name : str
        Name of the spots layer (the image is called ``'{name} H&E'``).

    Returns
    -------
    list of tuple
        The H&E Image layer and the spots Points layer. The spots layer's ``metadata['cell2location']``
        carries the SpatialData, its table and the reference signatures (and the single-cell reference
        and ground truth in ``extra``), so the Data widget is ready to fit.
    """
    from ._layers import spatial_layer_data
    from .datasets import synthetic_visium

    data = synthetic_visium(n_spots=n_spots, n_genes=n_genes, n_cell_types=n_cell_types, seed=seed)
    sdata = data.to_spatialdata()
    layers = spatial_layer_data(
        sdata.tables["table"], sdata, name=name, signatures=data.signatures, source="synthetic_visium"
    )
    ctx = layers[-1][1]["metadata"]["cell2location"]
    ctx.extra.update(reference=data.reference, truth=data.truth, batch_key="batch")
    return layers


def make_synthetic_section() -> list[tuple]:
    """Sample data contribution: a 600-spot, two-section synthetic Visium slide with 15 cell types."""
    return synthetic_section_layers()
