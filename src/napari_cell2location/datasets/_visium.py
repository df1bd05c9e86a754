"""The :class:`SyntheticVisium` container and the assembly of its AnnData objects and ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata
import numpy as np
import pandas as pd

from ._constants import _FIDUCIAL_RATIO, FULLRES_UM_PER_PX, HIRES_SCALEF, LOWRES_SCALEF, SPOT_DIAMETER_UM
from ._expression import _REF_BATCH_NAMES, _ReferenceCounts, _SpatialCounts, _to_csr
from ._layout import _Composition

if TYPE_CHECKING:  # pragma: no cover
    import spatialdata

_LIBRARY_ID = "synthetic_visium"


@dataclass
class SyntheticVisium:
    """A synthetic Visium experiment with its single-cell reference and the ground truth behind both.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts, shape (n_obs, n_vars) = (n_spots, n_genes); raw integer counts as CSR float32.
        ``obs`` has ``'batch'`` (categorical, one per section), ``'in_tissue'``, ``'array_row'``,
        ``'array_col'``; ``obsm['spatial']`` holds (x, y) in full-resolution pixels; ``uns['spatial']``
        follows the scanpy layout.
    reference : anndata.AnnData
        Labelled single-cell counts, shape (n_cells, n_vars); ``obs`` has ``'cell_type'`` and ``'batch'``.
    signatures : pandas.DataFrame
        True expected counts per cell ``g_fg``, shape (n_vars, n_cell_types); index gene names, columns
        cell type names.
    truth : dict
        Ground truth; see :func:`synthetic_visium` for its keys.
    image : numpy.ndarray or None
        Synthetic H&E image at hires scale, shape (H, W, 3), uint8; ``None`` when not generated.
    scalefactors : dict
        Space Ranger ``scalefactors_json.json``-style scale factors.
    library_id : str
        Name of the library, the key in ``adata.uns['spatial']`` and the prefix of SpatialData elements.
    """

    adata: anndata.AnnData
    reference: anndata.AnnData
    signatures: pd.DataFrame
    truth: dict = field(repr=False)
    image: np.ndarray | None = field(repr=False)
    scalefactors: dict
    library_id: str

    def to_spatialdata(self) -> spatialdata.SpatialData:
        """Build a SpatialData object laid out as ``spatialdata_io.visium()`` lays out a Space Ranger folder.

        Elements: image ``'{library_id}_hires_image'`` (dims c, y, x; a ``Scale`` of
        ``1 / tissue_hires_scalef`` maps it onto full-resolution pixels of the ``'global'`` coordinate
        system), shapes ``'{library_id}_spots'`` (circles at ``obsm['spatial']`` with ``'radius'`` in
        full-resolution pixels, identity to ``'global'``) and table ``'table'`` annotating the shapes through
        ``region_key='region'`` and ``instance_key='spot_id'``. Both the image and the shapes are also in
        the ``'downscaled_hires'`` coordinate system (image pixels). The reference is not included.

        Returns
        -------
        spatialdata.SpatialData
            The image (when one was generated), the spot circles and the counts table.
        """
        import spatialdata as sd
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale

        lib = self.library_id
        scalef = float(self.scalefactors["tissue_hires_scalef"])
        shapes_name = f"{lib}_spots"
        n_obs = self.adata.n_obs
        spot_id = np.arange(n_obs)

        images = {}
        if self.image is not None:
            images[f"{lib}_hires_image"] = Image2DModel.parse(
                np.moveaxis(self.image, -1, 0),
                dims=("c", "y", "x"),
                c_coords=["r", "g", "b"],
                transformations={
                    "global": Scale([1.0 / scalef, 1.0 / scalef], axes=("y", "x")),
                    "downscaled_hires": Identity(),
                },
            )
        radius = float(self.scalefactors["spot_diameter_fullres"]) / 2.0
        shapes = ShapesModel.parse(
            np.asarray(self.adata.obsm["spatial"], dtype=np.float64),
            geometry=0,
            radius=np.full(n_obs, radius),
            index=pd.Index(spot_id, name="spot_id"),
            transformations={
                "global": Identity(),
                "downscaled_hires": Scale([scalef, scalef], axes=("x", "y")),
            },
        )
        table = self.adata.copy()
        # the image lives in the SpatialData image element; keep only the scale factors in the table
        table.uns["spatial"] = {lib: {"scalefactors": dict(self.scalefactors)}}
        table.obs["region"] = pd.Categorical([shapes_name] * n_obs)
        table.obs["spot_id"] = spot_id
        table = TableModel.parse(table, region=shapes_name, region_key="region", instance_key="spot_id")
        return sd.SpatialData(images=images, shapes={shapes_name: shapes}, tables={"table": table})


def _names(prefix: str, n: int, width: int) -> list[str]:
    """``n`` names ``prefix`` + zero-padded index, at least ``width`` digits wide."""
    width = max(width, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


@dataclass
class _Names:
    """Names of the spots, genes, cell types, sections and zones of one synthetic experiment."""

    spots: np.ndarray  # object array, so that nuclei can index it and hold None for filler cells
    genes: list[str]
    types: list[str]
    batches: list[str]
    zones: list[str]

    @classmethod
    def make(cls, n_spots: int, n_genes: int, n_cell_types: int, n_batches: int, n_zones: int) -> _Names:
        return cls(
            spots=np.array(_names("spot_", n_spots, 4), dtype=object),
            genes=_names("gene_", n_genes, 4),
            types=_names("Type_", n_cell_types, 2),
            batches=[f"section_{b}" for b in range(n_batches)],
            zones=_names("zone_", n_zones, 1),
        )


def _scalefactors() -> dict[str, float]:
    """Space Ranger ``scalefactors_json.json`` entries of the synthetic image."""
    return {
        "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": LOWRES_SCALEF,
        "spot_diameter_fullres": SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
        "fiducial_diameter_fullres": _FIDUCIAL_RATIO * SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
    }


def _spatial_adata(
    comp: _Composition, spatial: _SpatialCounts, names: _Names, scalefactors: dict[str, float]
) -> anndata.AnnData:
    """Spatial AnnData: counts, Visium ``obs`` columns, ``obsm['spatial']`` and scanpy-style ``uns['spatial']``."""
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([names.batches[b] for b in comp.batch_idx], categories=names.batches),
            "in_tissue": np.ones(len(comp.batch_idx), dtype=np.int64),
            "array_row": comp.array_rc[:, 0].astype(np.int64),
            "array_col": comp.array_rc[:, 1].astype(np.int64),
        },
        index=pd.Index(names.spots.astype(str)),
    )
    adata = anndata.AnnData(X=_to_csr(spatial.counts), obs=obs, var=pd.DataFrame(index=pd.Index(names.genes)))
    adata.obsm["spatial"] = comp.xy_um / FULLRES_UM_PER_PX
    adata.uns["spatial"] = {_LIBRARY_ID: {"scalefactors": dict(scalefactors)}}
    return adata


def _reference_adata(ref: _ReferenceCounts, names: _Names) -> anndata.AnnData:
    """Reference AnnData with ``obs['cell_type']`` and ``obs['batch']``."""
    batch_names = list(_REF_BATCH_NAMES)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([names.types[f] for f in ref.cell_type], categories=names.types),
            "batch": pd.Categorical([batch_names[b] for b in ref.batch], categories=batch_names),
        },
        index=pd.Index(_names("cell_", len(ref.cell_type), 5)),
    )
    return anndata.AnnData(X=_to_csr(ref.counts), obs=obs, var=pd.DataFrame(index=pd.Index(names.genes)))


def _truth(
    comp: _Composition,
    spatial: _SpatialCounts,
    ref: _ReferenceCounts,
    markers: dict[int, np.ndarray],
    names: _Names,
    spots: pd.Index,
) -> dict[str, Any]:
    """Ground truth of :func:`synthetic_visium` (without the image keys, which are set to None)."""
    types, genes, batches, zones = names.types, names.genes, names.batches, names.zones
    w_sf = comp.w_sf
    return {
        "cell_abundance": pd.DataFrame(w_sf.astype(np.int64), index=spots, columns=types),
        "n_cells": pd.Series(w_sf.sum(axis=1).astype(np.int64), index=spots, name="n_cells"),
        "expected_cells": pd.Series(comp.expected, index=spots, name="expected_cells"),
        "cell_type_probability": pd.DataFrame(comp.prob, index=spots, columns=types),
        "zones": pd.DataFrame(comp.zones, index=spots, columns=zones),
        "zone_preference": pd.DataFrame(comp.preference, index=types, columns=zones),
        "m_g": pd.Series(spatial.m_g, index=genes, name="m_g"),
        "detection_y_s": pd.Series(spatial.y_s, index=spots, name="detection_y_s"),
        "detection_y_e": pd.Series(spatial.y_e, index=batches, name="detection_y_e"),
        "s_eg": pd.DataFrame(spatial.s_eg, index=batches, columns=genes),
        "alpha_eg": pd.DataFrame(spatial.alpha_eg, index=batches, columns=genes),
        "marker_genes": {types[f]: [genes[g] for g in idx] for f, idx in markers.items()},
        "reference_batch_effect": pd.DataFrame(ref.batch_effect, index=list(_REF_BATCH_NAMES), columns=genes),
        "reference_alpha_g": pd.Series(ref.alpha_g, index=genes, name="reference_alpha_g"),
        "nuclei": None,
        "tissue_mask": None,
    }
