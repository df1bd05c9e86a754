"""Reader: every format in ../shared/data opens with spots on the tissue, checked numerically."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from napari_cell2location._reader import napari_get_reader
from napari_cell2location.io import read_spaceranger

# files of the shared data folder (tests that read them skip when it is absent: fixture shared_path)
EMBRYO = "mouse_embryo_cytassist"
BRAIN_H5AD = os.path.join("mouse_brain_hippocampus", "derived", "visium_hippocampus_spacexr.h5ad")
GIOTTO_H5AD = os.path.join("mouse_brain_hippocampus", "derived", "visium_dg_giotto.h5ad")
LYMPH_H5AD = os.path.join("human_lymph_node_rctd", "derived", "visium_lymph_node_1000spots.h5ad")
REFERENCE_H5AD = os.path.join("mouse_brain_hippocampus", "derived", "reference_dropviz_hippocampus.h5ad")


def _read(path):
    reader = napari_get_reader(str(path))
    assert reader is not None, f"reader does not claim {path}"
    layers = reader(str(path))
    images = [layer for layer in layers if layer[2] == "image"]
    points = [layer for layer in layers if layer[2] == "points"]
    assert len(points) == 1
    return images, points[0]


def _image_pixels(world_yx, image_kwargs):
    """World (row, col) -> image (row, col) through the layer's affine (what napari does)."""
    aff = np.asarray(image_kwargs["affine"], dtype=float)
    h = np.c_[world_yx, np.ones(len(world_yx))] @ np.linalg.inv(aff).T
    return h[:, :2]


def _sample(image, rc):
    r = np.clip(np.round(rc[:, 0]).astype(int), 0, image.shape[0] - 1)
    c = np.clip(np.round(rc[:, 1]).astype(int), 0, image.shape[1] - 1)
    return image[r, c]


def _tissue_score(image):
    """Tissue darkness/stain: 255 - grey + saturation; background (glass) scores low."""
    img = np.asarray(image[..., :3], dtype=float)
    grey = img.mean(-1)
    sat = img.max(-1) - img.min(-1)
    return (255 - grey) + sat


def test_spaceranger_mtx_folder_spots_on_tissue(shared_path):
    embryo = shared_path(EMBRYO)
    images, (yx, kwargs, _) = _read(embryo)
    assert len(images) == 1
    image, ikw, _ = images[0]
    assert image.shape == (600, 600, 3) and ikw["rgb"]
    np.testing.assert_allclose(np.diag(ikw["affine"])[:2], 1 / 0.2)  # lowres scale factor 0.2
    adata = kwargs["metadata"]["cell2location"].adata
    assert adata.shape == (2898, 19465) and (adata.obs["in_tissue"] == 1).all()
    assert kwargs["size"] == pytest.approx(14.9649, rel=1e-3)
    # the positions file also has the 2094 off-tissue spots: compare the image under both sets
    pos = pd.read_csv(os.path.join(embryo, "spatial", "tissue_positions.csv"))
    off = pos.loc[pos["in_tissue"] == 0, ["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(float)
    score = _tissue_score(image)
    on_score = _sample(score, _image_pixels(yx, ikw))
    off_score = _sample(score, _image_pixels(off, ikw))
    assert np.median(on_score) > np.median(off_score) + 40, (np.median(on_score), np.median(off_score))
    # a wrong scale (hires factor) would put them elsewhere: the check has teeth
    wrong = dict(ikw, affine=np.diag([1 / 0.6666667, 1 / 0.6666667, 1.0]))
    assert np.median(_sample(score, _image_pixels(yx, wrong))) < np.median(on_score) - 20


@pytest.mark.parametrize("name", [BRAIN_H5AD, GIOTTO_H5AD], ids=os.path.basename)
def test_scanpy_h5ad_lowres_spots_on_tissue(name, shared_path):
    from skimage.filters import threshold_otsu

    path = shared_path(name)
    images, (yx, kwargs, _) = _read(path)
    image, ikw, _ = images[0]
    assert image.shape == (600, 576, 3)
    np.testing.assert_allclose(np.diag(ikw["affine"])[:2], 1 / 0.051033426)
    assert kwargs["size"] == pytest.approx(89.44476, rel=1e-6)
    adata = kwargs["metadata"]["cell2location"].adata
    np.testing.assert_allclose(yx, adata.obsm["spatial"][:, ::-1])
    np.testing.assert_allclose(yx[:, 0], adata.obs["pxl_row_in_fullres"])
    score = _tissue_score(image)
    tissue = score > threshold_otsu(score)
    on = _sample(tissue, _image_pixels(yx, ikw))
    assert on.mean() > 0.97, on.mean()
    assert tissue.mean() < 0.8  # the mask is not everything
    # the hippocampal cell layers are dark (dense nuclei) and have the most counts: darkness under each spot
    # follows its counts (r ~ 0.57) only when the spots are placed right (swapped x/y, a 3-spot shift or the
    # hires factor instead of lowres give r < 0.15)
    from scipy.ndimage import gaussian_filter

    dark = gaussian_filter(255.0 - image.mean(-1), 1)
    log_counts = np.log(kwargs["features"]["total_counts"].to_numpy())

    def r(points):
        return np.corrcoef(log_counts, _sample(dark, _image_pixels(points, ikw)))[0, 1]

    assert r(yx) > 0.45
    for wrong in (yx[:, ::-1], yx + [0, 300], yx - [300, 0], yx * 0.17011142 / 0.051033426):
        assert r(wrong) < r(yx) - 0.3


def test_h5ad_without_image_opens_spots_only(shared_path):
    images, (yx, kwargs, _) = _read(shared_path(LYMPH_H5AD))
    assert images == []
    assert yx.shape == (1000, 2)
    # 0.55 x the lattice pitch (~138 px = 100 µm)
    assert 70 < kwargs["size"] < 80


def test_reference_h5ad_opened_as_a_section_says_where_it_goes(shared_path):
    """A single-cell reference opened with File > Open is claimed (napari would otherwise blame the plugin
    in a generic error) and answered with one notification that points to the Reference tab."""
    pytest.importorskip("napari")
    from napari.utils.notifications import notification_manager

    from napari_cell2location._reader import NO_LAYERS

    reader = napari_get_reader(shared_path(REFERENCE_H5AD))
    assert reader is not None
    n = len(notification_manager.records)
    assert reader(shared_path(REFERENCE_H5AD)) == NO_LAYERS
    messages = [str(r.message) for r in notification_manager.records[n:]]
    assert len(messages) == 1, messages
    headline, detail = messages[0].split("\n", 1)
    assert headline == "Not a section: a single-cell table?"
    assert "single-cell reference" in detail and "Reference tab" in detail and "observations" in detail
    assert napari_get_reader(shared_path("mouse_brain_hippocampus")) is None


def _write_10x_h5(adata, path):
    import h5py
    from scipy import sparse

    x = sparse.csc_matrix(adata.X.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = x.data, x.indices, x.indptr
        m["shape"] = np.array(x.shape, dtype=np.int32)
        m["barcodes"] = np.array(adata.obs_names, dtype="S")
        feats = m.create_group("features")
        feats["name"] = np.array(adata.var_names, dtype="S")
        feats["id"] = np.array(adata.var["gene_ids"], dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")


def test_spaceranger_h5_and_old_positions_list(tmp_path, shared_path):
    """The old layout (header-less tissue_positions_list.csv, .h5 matrix) inside outs/ reads the same."""
    embryo = shared_path(EMBRYO)
    ref = read_spaceranger(embryo)
    outs = tmp_path / "sample" / "outs"
    (outs / "spatial").mkdir(parents=True)
    sub = ref[:, :500].copy()
    _write_10x_h5(sub, outs / "filtered_feature_bc_matrix.h5")
    pos = pd.read_csv(os.path.join(embryo, "spatial", "tissue_positions.csv"))
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    for name in ("scalefactors_json.json", "tissue_lowres_image.png"):
        shutil.copy(os.path.join(embryo, "spatial", name), outs / "spatial" / name)
    images, (yx, kwargs, _) = _read(tmp_path / "sample")  # the parent of outs/
    adata = kwargs["metadata"]["cell2location"].adata
    assert adata.shape == (2898, 500)
    np.testing.assert_array_equal(adata.X.toarray(), sub.X.toarray())
    np.testing.assert_allclose(adata.obsm["spatial"], ref.obsm["spatial"])
    assert list(adata.uns["spatial"]) == ["sample"]
    assert json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["tissue_lowres_scalef"] == 0.2


def test_synthetic_spatialdata_zarr_nuclei_inside_their_spots(tmp_path):
    """SpatialData .zarr: every nucleus drawn for a spot's cells lies inside that spot's circle in napari."""
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=80, n_genes=30, n_cell_types=3, seed=3)
    path = tmp_path / "section.zarr"
    data.to_spatialdata().write(path)
    images, (yx, kwargs, _) = _read(path)
    image, ikw, _ = images[0]
    np.testing.assert_allclose(np.asarray(image), data.image)
    nuclei = data.truth["nuclei"]
    nuclei = nuclei[nuclei["spot"].notna() & (nuclei["spot"].astype(str) != "")]
    adata = kwargs["metadata"]["cell2location"].adata
    spot_row = pd.Series(np.arange(adata.n_obs), index=adata.obs_names.astype(str))
    idx = spot_row.reindex(nuclei["spot"].astype(str)).to_numpy()
    ok = ~np.isnan(idx)
    assert ok.sum() > 100
    aff = np.asarray(ikw["affine"])
    world = np.c_[nuclei[["row", "col"]].to_numpy(float), np.ones(len(nuclei))] @ aff.T
    dist = np.hypot(*(world[ok, :2] - yx[idx[ok].astype(int)]).T)
    assert dist.max() <= kwargs["size"] / 2, (dist.max(), kwargs["size"] / 2)
    tissue = _sample(data.truth["tissue_mask"], _image_pixels(yx, ikw))
    assert tissue.all()


def test_two_libraries_side_by_side():
    """An h5ad with two libraries in one frame opens them side by side, images and spots together."""
    import anndata

    from napari_cell2location._layers import spatial_layer_data

    rng = np.random.default_rng(0)
    xy = rng.uniform(100, 900, size=(40, 2))
    adata = anndata.AnnData(rng.poisson(3, size=(40, 5)).astype(np.float32))
    adata.obsm["spatial"] = xy
    adata.obs["library_id"] = pd.Categorical(["A"] * 20 + ["B"] * 20)
    img = np.zeros((100, 100, 3), np.uint8)
    sf = {"tissue_hires_scalef": 0.1, "spot_diameter_fullres": 20.0}
    adata.uns["spatial"] = {k: {"images": {"hires": img}, "scalefactors": sf} for k in ("A", "B")}
    layers = spatial_layer_data(adata)
    imgs = [layer for layer in layers if layer[2] == "image"]
    yx = layers[-1][0]
    assert len(imgs) == 2
    xa = imgs[0][1]["affine"][1, 2], imgs[1][1]["affine"][1, 2]
    assert xa[1] >= xa[0] + 1000  # image B starts right of image A (1000 world px wide)
    np.testing.assert_allclose(yx[:20], xy[:20, ::-1])  # section A in place
    np.testing.assert_allclose(yx[20:, 1] - xy[20:, 0], xa[1] - xa[0])  # B's spots moved with its image
    assert yx[20:, 1].min() > yx[:20, 1].max()


def _library(name, width, rng, n=20):
    """A one-library scanpy AnnData: a hires image 1000 world px tall and ``width`` wide, spots on it."""
    import anndata

    xy = np.c_[rng.uniform(50, width - 50, n), rng.uniform(100, 900, n)]
    adata = anndata.AnnData(rng.poisson(3, size=(n, 5)).astype(np.float32))
    adata.obs_names = [f"{name}{i}" for i in range(n)]
    adata.obsm["spatial"] = xy
    adata.obs["library_id"] = pd.Categorical([name] * n)
    sf = {"tissue_hires_scalef": 0.1, "spot_diameter_fullres": 20.0}
    adata.uns["spatial"] = {name: {"images": {"hires": np.zeros((100, width // 10, 3), np.uint8)}, "scalefactors": sf}}
    return adata


def _image_cols(image_layer):
    """World column range of an image layer (through its affine)."""
    data, kwargs, _ = image_layer
    aff = np.asarray(kwargs["affine"])
    return aff[1, 2], aff[1, 2] + data.shape[1] * aff[1, 1]


def test_same_gap_for_libraries_and_datasets(tmp_path):
    """Two libraries of one AnnData and two datasets opened together are placed by the same rule:
    the first stays, the second follows SECTION_GAP x the widest one to its right, never overlapped."""
    import anndata

    from napari_cell2location._layers import spatial_layer_data
    from napari_cell2location.io._sections import SECTION_GAP

    rng = np.random.default_rng(1)
    a, b = _library("A", 600, rng), _library("B", 1000, rng)  # same frame origin: they overlap
    both = anndata.concat([a, b], uns_merge="unique")
    both.obs["library_id"] = pd.Categorical(["A"] * a.n_obs + ["B"] * b.n_obs)
    one = spatial_layer_data(both)
    a.write_h5ad(tmp_path / "A.h5ad")
    b.write_h5ad(tmp_path / "B.h5ad")
    paths = [str(tmp_path / "A.h5ad"), str(tmp_path / "B.h5ad")]
    reader = napari_get_reader(paths)
    assert reader is not None
    two = reader(paths)

    gap = SECTION_GAP * 1000  # of the widest section (B)
    for layers, points_b in ((one, one[-1][0][a.n_obs :]), (two, two[-1][0])):
        (a0, a1), (b0, b1) = (_image_cols(layer) for layer in layers if layer[2] == "image")
        assert (a0, a1) == (0.0, 600.0)  # A stays in place
        assert b0 - a1 == pytest.approx(gap)
        assert b1 - b0 == pytest.approx(1000.0)
        np.testing.assert_allclose(points_b, b.obsm["spatial"][:, ::-1] + [0, b0])  # B's spots moved with it
        assert points_b[:, 1].min() > a1
    np.testing.assert_allclose(one[-1][0][: a.n_obs], two[1][0])  # A's spots unmoved in both
    np.testing.assert_allclose(one[1][1]["affine"], two[2][1]["affine"])  # B's image placed the same


def test_viewer_open_with_plugin(make_napari_viewer, tmp_path, shared_data):
    pytest.importorskip("pytestqt")
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("images need OpenGL (use xvfb-run)")
    from napari_cell2location.datasets import synthetic_visium

    path = tmp_path / "s.zarr"
    synthetic_visium(n_spots=40, n_genes=25, n_cell_types=3, seed=0).to_spatialdata().write(path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cell2location")
    kinds = sorted(type(layer).__name__ for layer in viewer.layers)
    assert kinds == ["Image", "Points"]
    embryo = os.path.join(shared_data, EMBRYO)
    if os.path.isdir(embryo):
        viewer.open(embryo, plugin="napari-cell2location")
        assert len(viewer.layers) == 4


def test_datasets_opened_into_a_viewer_sit_beside_what_it_shows(make_napari_viewer, tmp_path):
    """napari opens the files of one Open one reader call at a time: each next dataset is placed right of
    what the viewer already shows (the same gap rule), never on top of it."""
    pytest.importorskip("pytestqt")
    from napari_cell2location.io._sections import SECTION_GAP

    rng = np.random.default_rng(2)
    _library("A", 600, rng).write_h5ad(tmp_path / "A.h5ad")
    _library("B", 600, rng).write_h5ad(tmp_path / "B.h5ad")  # same frame: it would cover A exactly
    viewer = make_napari_viewer()
    viewer.open([str(tmp_path / "A.h5ad"), str(tmp_path / "B.h5ad")], plugin="napari-cell2location")
    a_img, b_img = viewer.layers["A H&E"], viewer.layers["B H&E"]
    a_ext, b_ext = np.asarray(a_img.extent.world), np.asarray(b_img.extent.world)
    assert b_ext[0][1] >= a_ext[1][1] + 0.9 * SECTION_GAP * 600  # B starts right of A, a gap between
    assert viewer.layers["B"].data[:, 1].min() > a_ext[1][1]  # and its spots went with it
    # a third, opened later, goes right of both
    _library("C", 600, rng).write_h5ad(tmp_path / "C.h5ad")
    viewer.open(str(tmp_path / "C.h5ad"), plugin="napari-cell2location")
    assert np.asarray(viewer.layers["C H&E"].extent.world)[0][1] >= b_ext[1][1]
