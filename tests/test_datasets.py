"""Tests of the synthetic Visium generator (``napari_cell2location.datasets``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.spatial import cKDTree

from napari_cell2location.datasets import SyntheticVisium, density_sweep, synthetic_visium

SMALL = {"n_spots": 60, "n_genes": 80, "n_cell_types": 5, "n_batches": 1}


@pytest.fixture(scope="module")
def data() -> SyntheticVisium:
    """The default dataset (600 spots x 1000 genes, 15 types, 2 sections, with image)."""
    return synthetic_visium()


@pytest.fixture(scope="module")
def small() -> SyntheticVisium:
    return synthetic_visium(**SMALL, image=True, seed=3)


def _spot_nuclei_counts(d: SyntheticVisium) -> np.ndarray:
    """Number of nuclei centres inside each spot circle, converting image px to full-res px."""
    scalef = d.scalefactors["tissue_hires_scalef"]
    nuclei = d.truth["nuclei"]
    xy_fullres = np.stack([nuclei["col"].to_numpy(), nuclei["row"].to_numpy()], axis=1) / scalef
    radius = d.scalefactors["spot_diameter_fullres"] / 2
    hits = cKDTree(xy_fullres).query_ball_point(np.asarray(d.adata.obsm["spatial"]), radius)
    return np.array([len(h) for h in hits])


# ---------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_data(small):
    again = synthetic_visium(**SMALL, image=True, seed=3)
    assert (small.adata.X != again.adata.X).nnz == 0
    assert (small.reference.X != again.reference.X).nnz == 0
    np.testing.assert_array_equal(small.image, again.image)
    pd.testing.assert_frame_equal(small.truth["nuclei"], again.truth["nuclei"])
    np.testing.assert_array_equal(small.adata.obsm["spatial"], again.adata.obsm["spatial"])


def test_different_seed_different_data(small):
    other = synthetic_visium(**SMALL, image=True, seed=4)
    assert (small.adata.X != other.adata.X).nnz > 0
    assert not np.array_equal(small.image, other.image)
    assert not small.truth["cell_abundance"].equals(other.truth["cell_abundance"])


def test_counts_do_not_depend_on_image_flag(small):
    no_image = synthetic_visium(**SMALL, image=False, seed=3)
    assert (small.adata.X != no_image.adata.X).nnz == 0
    assert no_image.image is None and no_image.truth["nuclei"] is None
    assert "images" not in no_image.adata.uns["spatial"][no_image.library_id]


# ---------------------------------------------------------------------------------------------------------
# shapes, names, counts


def test_shapes_and_names(data):
    a = data.adata
    assert a.shape == (600, 1000)
    assert list(a.obs_names[:2]) == ["spot_0000", "spot_0001"] and a.obs_names[-1] == "spot_0599"
    assert list(a.var_names[:2]) == ["gene_0000", "gene_0001"]
    assert list(a.obs.columns[:4]) == ["batch", "in_tissue", "array_row", "array_col"]
    assert (a.obs["in_tissue"] == 1).all()
    assert a.obsm["spatial"].shape == (600, 2)
    types = [f"Type_{i:02d}" for i in range(15)]
    assert data.signatures.shape == (1000, 15)
    assert list(data.signatures.columns) == types
    assert data.signatures.index.equals(a.var_names)
    assert data.reference.var_names.equals(a.var_names)
    ab = data.truth["cell_abundance"]
    assert ab.shape == (600, 15) and list(ab.columns) == types and ab.index.equals(a.obs_names)
    assert data.truth["m_g"].index.equals(a.var_names)
    assert data.truth["detection_y_s"].index.equals(a.obs_names)
    assert list(data.truth["detection_y_e"].index) == ["section_0", "section_1"]
    assert data.truth["s_eg"].shape == (2, 1000) and data.truth["alpha_eg"].shape == (2, 1000)
    assert data.image.ndim == 3 and data.image.shape[2] == 3 and data.image.dtype == np.uint8


def test_counts_are_nonnegative_integers_in_csr(data):
    for x in (data.adata.X, data.reference.X):
        assert sparse.isspmatrix_csr(x) and x.dtype == np.float32
        assert x.data.min() >= 0
        np.testing.assert_array_equal(x.data, np.round(x.data))


def test_library_sizes_plausible(data):
    totals = np.asarray(data.adata.X.sum(axis=1)).ravel()
    assert totals.min() > 50
    assert 1_000 < np.median(totals) < 20_000
    per_cell = data.signatures.sum(axis=0)
    assert ((per_cell > 1e3) & (per_cell < 1e4)).all()


def test_overdispersion_and_detection_ranges(data):
    alpha = data.truth["alpha_eg"].to_numpy()
    assert alpha.min() >= 5 and alpha.max() <= 50
    y_s, y_e = data.truth["detection_y_s"], data.truth["detection_y_e"]
    batch = data.adata.obs["batch"]
    for b in y_e.index:
        assert abs(y_s[batch == b].mean() / y_e[b] - 1) < 0.05  # y_s ~ Gamma(20, 20 / y_e)
    assert (data.truth["m_g"] > 0).all() and 0.7 < np.median(data.truth["m_g"]) < 1.4


# ---------------------------------------------------------------------------------------------------------
# geometry


def test_sections_present_and_separate(data):
    a = data.adata
    assert list(a.obs["batch"].cat.categories) == ["section_0", "section_1"]
    sizes = a.obs["batch"].value_counts()
    assert sizes.sum() == 600 and (sizes == 300).all()
    xy = np.asarray(a.obsm["spatial"])
    s0, s1 = (a.obs["batch"] == "section_0").to_numpy(), (a.obs["batch"] == "section_1").to_numpy()
    assert xy[s0, 0].max() < xy[s1, 0].min()  # side by side in x
    gap = cKDTree(xy[s0]).query(xy[s1])[0].min()
    assert gap > 2 * 200  # more than two pitches between the sections: never overlapping


def test_lattice_pitch_and_spot_size(data):
    xy = np.asarray(data.adata.obsm["spatial"])
    dist, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(dist[:, 1], 200.0, rtol=1e-9)  # 100 µm at 0.5 µm per full-res px
    sf = data.scalefactors
    assert sf["spot_diameter_fullres"] == pytest.approx(110.0)  # 55 µm
    assert sf["tissue_hires_scalef"] == pytest.approx(0.25)
    assert sf["fiducial_diameter_fullres"] > sf["spot_diameter_fullres"]
    assert 0 < sf["tissue_lowres_scalef"] < sf["tissue_hires_scalef"]
    # hexagonal neighbours: six at the pitch for interior spots
    n6 = np.array([len(h) for h in cKDTree(xy).query_ball_point(xy, 200.0 * 1.01)]) - 1
    assert n6.max() == 6 and (n6 == 6).mean() > 0.6


def test_array_indices_match_coordinates(data):
    obs, xy = data.adata.obs, np.asarray(data.adata.obsm["spatial"])
    for b in obs["batch"].cat.categories:
        sel = (obs["batch"] == b).to_numpy()
        row, col = obs["array_row"].to_numpy()[sel], obs["array_col"].to_numpy()[sel]
        assert row.min() >= 0 and col.min() >= 0
        assert ((row + col) % 2 == 0).all()
        x0 = xy[sel, 0] - col * 100.0
        y0 = xy[sel, 1] - row * 200.0 * np.sqrt(3) / 2
        np.testing.assert_allclose(x0, x0[0], atol=1e-6)
        np.testing.assert_allclose(y0, y0[0], atol=1e-6)


def test_scanpy_layout(data):
    entry = data.adata.uns["spatial"][data.library_id]
    assert entry["images"]["hires"] is data.image
    assert entry["scalefactors"] == data.scalefactors


def test_spots_lie_on_tissue(data):
    scalef = data.scalefactors["tissue_hires_scalef"]
    rc = np.rint(np.asarray(data.adata.obsm["spatial"])[:, ::-1] * scalef).astype(int)
    assert data.truth["tissue_mask"][rc[:, 0], rc[:, 1]].all()
    # the whole spot circle is on tissue
    radius = data.scalefactors["spot_diameter_fullres"] / 2 * scalef
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = rc[:, None, :] + np.rint(radius * np.stack([np.sin(angles), np.cos(angles)], axis=1)).astype(int)
    assert data.truth["tissue_mask"][ring[..., 0], ring[..., 1]].all()
    # and the image is stained there, white far outside
    assert data.image[rc[:, 0], rc[:, 1]].mean() < 220
    assert data.image[:5, :5].mean() > 235


# ---------------------------------------------------------------------------------------------------------
# cells and nuclei


def test_nuclei_in_each_spot_equal_n_cells(data, small):
    for d in (data, small):
        np.testing.assert_array_equal(_spot_nuclei_counts(d), d.truth["n_cells"].to_numpy())
        nuclei = d.truth["nuclei"]
        in_spot = nuclei["spot"].notna()
        counts = nuclei.loc[in_spot, "spot"].value_counts().reindex(d.adata.obs_names, fill_value=0)
        np.testing.assert_array_equal(counts.to_numpy(), d.truth["n_cells"].to_numpy())
        by_type = pd.crosstab(nuclei.loc[in_spot, "spot"], nuclei.loc[in_spot, "cell_type"])
        by_type = by_type.reindex(index=d.adata.obs_names, columns=d.signatures.columns, fill_value=0)
        np.testing.assert_array_equal(by_type.to_numpy(), d.truth["cell_abundance"].to_numpy())


def test_filler_cells_between_spots(data):
    nuclei = data.truth["nuclei"]
    filler = nuclei["spot"].isna()
    assert filler.sum() > data.truth["n_cells"].sum()  # spots cover about a quarter of the tissue
    # filler density is similar to the density inside spots
    scalef = data.scalefactors["tissue_hires_scalef"]
    spot_area_px = np.pi * (55.0 / 2 * 2 * scalef) ** 2  # µm -> full-res px -> image px
    density_spots = data.truth["n_cells"].sum() / (len(data.adata) * spot_area_px)
    tissue_px = data.truth["tissue_mask"].sum()
    density_filler = filler.sum() / (tissue_px - len(data.adata) * spot_area_px)
    assert 0.5 < density_filler / density_spots < 1.3


def test_nuclei_do_not_overlap(data):
    nuclei = data.truth["nuclei"]
    xy_um = nuclei[["col", "row"]].to_numpy() * 2.0  # one image px = 2 µm
    major = nuclei["major_um"].to_numpy()
    assert major.max() <= 9.0 + 1e-9 and np.median(major) >= 6.0
    pairs = cKDTree(xy_um).query_pairs(1.3 * major.max(), output_type="ndarray")
    dist = np.linalg.norm(xy_um[pairs[:, 0]] - xy_um[pairs[:, 1]], axis=1)
    assert (dist >= 1.3 * 0.5 * (major[pairs[:, 0]] + major[pairs[:, 1]]) - 1e-6).all()


def test_nuclei_are_visible_as_dark_blobs(small):
    feature = pytest.importorskip("skimage.feature")
    from scipy import ndimage

    darkness = 255.0 - small.image.astype(float).mean(axis=2)
    smooth = ndimage.gaussian_filter(darkness, 0.7)
    peaks = feature.peak_local_max(smooth, min_distance=2, threshold_abs=90)
    n_true = len(small.truth["nuclei"])
    assert abs(len(peaks) - n_true) < 0.03 * n_true


def test_cells_per_spot(data):
    n = data.truth["n_cells"]
    assert n.dtype.kind == "i" and n.min() >= 1
    assert abs(n.mean() - 8.0) < 0.8
    assert n.quantile(0.05) <= 4 and n.quantile(0.95) >= 12  # varies spatially
    np.testing.assert_array_equal(n.to_numpy(), data.truth["cell_abundance"].sum(axis=1).to_numpy())
    other = synthetic_visium(**SMALL, mean_cells_per_spot=20.0, image=False, seed=1)
    assert abs(other.truth["n_cells"].mean() - 20.0) < 3.0


def test_cell_types_zoned_presence_absence(data):
    w = data.truth["cell_abundance"]
    absent = (w == 0).mean(axis=0)
    assert (absent >= 0.2).all()  # every type is absent from a good share of spots
    assert ((w > 0).sum(axis=0) >= 10).all()  # and present somewhere
    # absence is spatially structured: each type is excluded (zero probability) from part of the tissue
    prob = data.truth["cell_type_probability"]
    excluded = prob < 1e-6
    assert (excluded.mean(axis=0) >= 0.2).all()
    assert (w[excluded].fillna(0) == 0).all().all()
    for t in w.columns:
        assert prob.loc[w[t] > 0, t].mean() > 2 * prob.loc[w[t] == 0, t].mean()


def test_signatures_distinguishable_but_correlated(data):
    g = data.signatures
    assert (g.to_numpy() > 0).all()
    corr = np.corrcoef(np.log(g.to_numpy()).T)[np.triu_indices(g.shape[1], 1)]
    assert corr.mean() > 0.4 and corr.max() < 0.99
    for t, genes in data.truth["marker_genes"].items():
        others = g.drop(columns=t).loc[genes].mean(axis=1)
        assert (g.loc[genes, t] / others).median() > 2


# ---------------------------------------------------------------------------------------------------------
# truth consistency


def test_spot_totals_follow_the_generative_model(data):
    a, tr = data.adata, data.truth
    w = tr["cell_abundance"].to_numpy()
    per_cell = (data.signatures.to_numpy() * tr["m_g"].to_numpy()[:, None]).sum(axis=0)  # sum_g m_g g_fg
    batch = a.obs["batch"].cat.codes.to_numpy()
    expected = (w @ per_cell + tr["s_eg"].to_numpy().sum(axis=1)[batch]) * tr["detection_y_s"].to_numpy()
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert np.corrcoef(totals, expected)[0, 1] > 0.95
    assert 0.9 < totals.sum() / expected.sum() < 1.1
    # the background is small next to the cells' signal
    assert tr["s_eg"].to_numpy().sum(axis=1).max() < 0.2 * per_cell.mean()


def test_reference(data):
    ref = data.reference
    assert list(ref.obs["cell_type"].cat.categories) == list(data.signatures.columns)
    counts = ref.obs["cell_type"].value_counts()
    assert (counts >= 20).all() and 40 < counts.mean() < 80
    assert set(ref.obs["batch"]) == {"ref_batch_0", "ref_batch_1"}
    assert (pd.crosstab(ref.obs["cell_type"], ref.obs["batch"]) > 0).to_numpy().mean() > 0.9
    # per-type mean counts recover the true signatures up to noise and batch effects
    x = ref.X.toarray()
    means = np.stack([x[(ref.obs["cell_type"] == t).to_numpy()].mean(axis=0) for t in data.signatures.columns], 1)
    r = np.corrcoef(np.log1p(means.ravel()), np.log1p(data.signatures.to_numpy().ravel()))[0, 1]
    assert r > 0.95


# ---------------------------------------------------------------------------------------------------------
# crowding, pixel size and the density sweep (issue 12)


def _min_spacing(d: SyntheticVisium) -> np.ndarray:
    """Centre distance over the mean major diameter of every pair of nuclei that could touch."""
    nuclei = d.truth["nuclei"]
    um = 0.5 / d.scalefactors["tissue_hires_scalef"]  # µm per image pixel
    xy = nuclei[["col", "row"]].to_numpy() * um
    major = nuclei["major_um"].to_numpy()
    pairs = cKDTree(xy).query_pairs(1.3 * major.max(), output_type="ndarray")
    dist = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
    return dist / (0.5 * (major[pairs[:, 0]] + major[pairs[:, 1]]))


def test_nucleus_spacing_lets_nuclei_touch_and_overlap():
    kw = {**SMALL, "mean_cells_per_spot": 15.0, "seed": 2}
    crowded = synthetic_visium(**kw, nucleus_spacing=0.8)
    ratio = _min_spacing(crowded)
    assert ratio.min() >= 0.8 - 1e-6
    assert (ratio < 1.0).sum() > 50  # overlapping pairs exist (none do at the default spacing of 1.3)
    assert _min_spacing(synthetic_visium(**kw)).min() >= 1.3 - 1e-6
    # the counts, the cells and the image size do not depend on the spacing; the image does
    default = synthetic_visium(**kw)
    assert (crowded.adata.X != default.adata.X).nnz == 0
    assert crowded.image.shape == default.image.shape and not np.array_equal(crowded.image, default.image)
    np.testing.assert_array_equal(_spot_nuclei_counts(crowded), crowded.truth["n_cells"].to_numpy())


def test_image_pixel_size():
    coarse = synthetic_visium(**SMALL, seed=5)
    fine = synthetic_visium(**SMALL, seed=5, image_um_per_px=1.0)
    assert fine.scalefactors["tissue_hires_scalef"] == 0.5 and coarse.scalefactors["tissue_hires_scalef"] == 0.25
    assert abs(fine.image.shape[0] - 2 * coarse.image.shape[0]) <= 2
    assert abs(fine.image.shape[1] - 2 * coarse.image.shape[1]) <= 2
    assert fine.truth["tissue_mask"].shape == fine.image.shape[:2]
    assert (fine.adata.X != coarse.adata.X).nnz == 0
    # the nuclei of the spots are the same cells at the same place in µm; the filler differs
    in_spot = [d.truth["nuclei"][d.truth["nuclei"]["spot"].notna()] for d in (coarse, fine)]
    np.testing.assert_allclose(in_spot[1][["row", "col"]].to_numpy(), 2 * in_spot[0][["row", "col"]].to_numpy())
    np.testing.assert_array_equal(in_spot[1]["major_um"].to_numpy(), in_spot[0]["major_um"].to_numpy())
    # rule 7 at the new scale: spots land on their own nuclei, and the stain is there
    np.testing.assert_array_equal(_spot_nuclei_counts(fine), fine.truth["n_cells"].to_numpy())
    rc = np.rint(fine.adata.obsm["spatial"][:, ::-1] * 0.5).astype(int)
    assert fine.truth["tissue_mask"][rc[:, 0], rc[:, 1]].all()
    # same stain per nucleus: mean darkness over the drawn nuclei is about the same at both scales
    dark = []
    for d in (coarse, fine):
        rc_n = np.rint(d.truth["nuclei"][["row", "col"]].to_numpy()).astype(int)
        dark.append(255.0 - d.image[rc_n[:, 0], rc_n[:, 1]].astype(float).mean())
    assert abs(dark[0] - dark[1]) < 0.1 * dark[0]


def test_density_sweep():
    sweep = list(density_sweep((2, 8, 15), n_spots=40, seed=4))
    assert [density for density, _ in sweep] == [2.0, 8.0, 15.0]
    means = [d.truth["n_cells"].mean() for _, d in sweep]
    assert means[0] < means[1] < means[2]
    for density, d in sweep:
        assert abs(d.truth["n_cells"].mean() / density - 1) < 0.25
        assert d.adata.n_obs == 40 and d.adata.obs["batch"].nunique() == 1
        assert _min_spacing(d).min() >= 0.8 - 1e-6
    # one tissue layout for all densities, and deterministic given the seed
    np.testing.assert_array_equal(sweep[0][1].adata.obsm["spatial"], sweep[2][1].adata.obsm["spatial"])
    again = next(density_sweep((15,), n_spots=40, seed=4))[1]
    np.testing.assert_array_equal(again.image, sweep[2][1].image)
    pd.testing.assert_frame_equal(again.truth["nuclei"], sweep[2][1].truth["nuclei"])
    # settings pass through
    fine = next(density_sweep((5,), n_spots=20, image_um_per_px=1.0, nucleus_spacing=1.0, n_genes=12))[1]
    assert fine.adata.n_vars == 12 and fine.scalefactors["tissue_hires_scalef"] == 0.5
    assert _min_spacing(fine).min() >= 1.0 - 1e-6


# ---------------------------------------------------------------------------------------------------------
# SpatialData


def test_to_spatialdata(small):
    from spatialdata.transformations import get_transformation

    sdata = small.to_spatialdata()
    lib = small.library_id
    image = sdata.images[f"{lib}_hires_image"]
    assert image.dims == ("c", "y", "x")
    np.testing.assert_array_equal(np.asarray(image.values), np.moveaxis(small.image, -1, 0))
    scale = get_transformation(image, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(scale)[:2], 1.0 / small.scalefactors["tissue_hires_scalef"])
    shapes = sdata.shapes[f"{lib}_spots"]
    coords = np.stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()], axis=1)
    np.testing.assert_allclose(coords, small.adata.obsm["spatial"])
    np.testing.assert_allclose(shapes["radius"], small.scalefactors["spot_diameter_fullres"] / 2)
    ident = get_transformation(shapes, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(ident, np.eye(3))
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == f"{lib}_spots"
    assert attrs["region_key"] == "region" and attrs["instance_key"] == "spot_id"
    np.testing.assert_array_equal(table.obs["spot_id"].to_numpy(), shapes.index.to_numpy())
    assert (table.X != small.adata.X).nnz == 0
    assert "images" not in table.uns["spatial"][lib]
    assert "images" in small.adata.uns["spatial"][lib]  # the dataclass's AnnData is left untouched


def test_to_spatialdata_without_image():
    d = synthetic_visium(**SMALL, image=False)
    sdata = d.to_spatialdata()
    assert len(sdata.images) == 0 and len(sdata.shapes) == 1 and "table" in sdata.tables


# ---------------------------------------------------------------------------------------------------------
# sizes, validation, imports


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_spots": 7, "n_genes": 10, "n_cell_types": 1, "n_batches": 3, "image": True},
        {"n_spots": 2500, "n_genes": 2000, "n_cell_types": 30, "image": False},
    ],
)
def test_other_sizes(kwargs):
    d = synthetic_visium(**kwargs)
    assert d.adata.shape == (kwargs["n_spots"], kwargs["n_genes"])
    assert d.adata.obs["batch"].nunique() == kwargs.get("n_batches", 2)
    assert d.signatures.shape == (kwargs["n_genes"], kwargs["n_cell_types"])
    assert d.truth["n_cells"].sum() == d.truth["cell_abundance"].to_numpy().sum()
    if kwargs["image"]:
        np.testing.assert_array_equal(_spot_nuclei_counts(d), d.truth["n_cells"].to_numpy())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_spots": 0},
        {"n_spots": 3, "n_batches": 4},
        {"n_genes": -1},
        {"mean_cells_per_spot": 0.0},
        {"n_batches": 1.5},
        {"nucleus_spacing": 0.0},
        {"image_um_per_px": -2.0},
        {"image_um_per_px": float("nan")},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_visium(**{**SMALL, "image": False, **kwargs})


def test_no_gui_or_spatialdata_import():
    code = (
        "import sys\n"
        "from napari_cell2location.datasets import synthetic_visium\n"
        "synthetic_visium(n_spots=30, n_genes=20, n_cell_types=3, n_batches=1)\n"
        "bad = [m for m in ('napari', 'qtpy', 'magicgui', 'spatialdata') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
