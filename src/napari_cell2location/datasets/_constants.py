"""Physical sizes of the Visium platform and the tuning constants of the synthetic generator.

Lengths are in µm unless the name says otherwise. The public constants are re-exported by
:mod:`napari_cell2location.datasets`.
"""

from __future__ import annotations

import numpy as np

#: Visium spot centre-to-centre distance (µm).
SPOT_PITCH_UM = 100.0
#: Visium spot diameter (µm).
SPOT_DIAMETER_UM = 55.0
#: Size of one full-resolution pixel (µm).
FULLRES_UM_PER_PX = 0.5
#: Scale factor full-resolution -> hires image (one hires pixel = 2 µm).
HIRES_SCALEF = 0.25
#: Scale factor full-resolution -> lowres image (as in Space Ranger, 600 / 2000 of hires).
LOWRES_SCALEF = 0.075
#: Fiducial / spot diameter ratio of Space Ranger's scalefactors_json.json.
_FIDUCIAL_RATIO = 1.615

_HIRES_UM_PER_PX = FULLRES_UM_PER_PX / HIRES_SCALEF  # size of one hires image pixel (µm)
_ROW_SPACING_UM = SPOT_PITCH_UM * np.sqrt(3.0) / 2.0  # vertical distance between lattice rows
_SECTION_GAP_UM = 200.0  # minimum free space between the bounding boxes of two sections
_SECTION_PAD_UM = 80.0  # bounding box of a section = its spot centres +- this
_IMAGE_MARGIN_UM = 100.0  # white border around the outermost section boxes
_TISSUE_DILATION_UM = 32.0  # tissue reaches this far beyond the spot-selection outline
_EDGE_MARGIN_UM = 2.0  # nuclei centres keep this distance from a spot's circle, inside and outside
_NUCLEUS_SPACING = 1.3  # minimum centre distance in units of the mean of two nuclei's major diameters
_NUCLEUS_DIAMETER_UM = (6.0, 9.0)
_ZONE_THRESHOLD = 0.3  # zone affinity below which a cell type is absent
_PER_GENE_COUNTS_PER_CELL = 2.5  # mean expected count per gene per cell in the signatures
