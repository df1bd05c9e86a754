"""Recovery of known abundances on the synthetic section (the model's correctness evidence)."""

from __future__ import annotations

import numpy as np

from napari_cell2location import Cell2location
from napari_cell2location.datasets import synthetic_visium


def test_recovers_synthetic_abundances():
    data = synthetic_visium(n_spots=300, n_genes=500, n_cell_types=10, image=False, seed=1)
    adata = data.adata
    Cell2location.setup_anndata(adata, batch_key="batch")
    mod = Cell2location(adata, data.signatures, N_cells_per_location=8.0, detection_alpha=20.0)
    mod.train(max_epochs=500, lr=0.01, progress_bar=False, seed=0, device="cpu")
    mod.export_posterior(adata, use_quantiles=True, add_to_obsm=["means", "q05", "q95"])
    truth = data.truth["cell_abundance"].loc[adata.obs_names].to_numpy()
    est = adata.obsm["means_cell_abundance_w_sf"].to_numpy()
    r = np.corrcoef(est.ravel(), truth.ravel())[0, 1]
    assert r >= 0.8, r
    # total cells per spot on the right scale and spatially right
    ratio = est.sum(1).mean() / truth.sum(1).mean()
    assert 0.7 < ratio < 1.4, ratio
    assert np.corrcoef(est.sum(1), truth.sum(1))[0, 1] > 0.5
    # spots without a cell type get less of it than spots with it, for every type
    for f in range(truth.shape[1]):
        absent, present = est[truth[:, f] == 0, f], est[truth[:, f] > 0, f]
        assert np.median(present) > 2 * np.median(absent), f
