"""Visium HD read by spatialdata-io: a SpatialData ``.zarr`` whose bins are square polygons, one table per bin
size (``square_008um``, ``square_016um``), opens as the Space Ranger folder does, at one bin size.

spatialdata-io is not installed here; the store is built in its layout from a synthetic run
(:func:`napari_cell2location.datasets.write_visium_hd`): for each size the bins as axis-aligned squares in the
``global`` coordinate system (full-resolution pixels), the table annotating them by ``region`` /
``location_id``, and the hires H&E scaled into place.
"""

from __future__ import annotations

import anndata
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, box

from napari_cell2location._cli import main
from napari_cell2location._layers import SHAPE_KEY, SpotContext, results_layer_data, spatial_layer_data
from napari_cell2location.datasets import write_visium_hd
from napari_cell2location.io import InputError, bin_tables, read_spatial, read_visium_hd
from napari_cell2location.io._sections import _shape_centres

SIZES = (8, 16)


def _write_store(hd, path) -> None:
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    shapes, tables = {}, {}
    for size in hd.bin_sizes:
        bins = read_visium_hd(hd.outs, bin_size=size)
        half = 0.5 * size / hd.microns_per_pixel
        squares = [box(x - half, y - half, x + half, y + half) for x, y in np.asarray(bins.obsm["spatial"], float)]
        region = f"Visium_HD_run_square_{size:03d}um"
        geo = gpd.GeoDataFrame(geometry=squares, index=bins.obs_names.copy())
        shapes[region] = ShapesModel.parse(geo, transformations={"global": Identity()})
        table = anndata.AnnData(X=bins.X.copy(), obs=pd.DataFrame(index=bins.obs_names.copy()), var=bins.var.copy())
        table.obs["region"] = pd.Categorical([region] * table.n_obs)
        table.obs["location_id"] = bins.obs_names.to_numpy()
        tables[f"square_{size:03d}um"] = TableModel.parse(
            table, region=region, region_key="region", instance_key="location_id"
        )
    scalef = hd.scalefactors[hd.bin_sizes[0]]["tissue_hires_scalef"]
    image = Image2DModel.parse(
        np.moveaxis(hd.image, -1, 0),
        dims=("c", "y", "x"),
        transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("y", "x"))},
    )
    sd.SpatialData(images={"Visium_HD_run_hires_image": image}, shapes=shapes, tables=tables).write(path)


@pytest.fixture(scope="module")
def hd_store(tmp_path_factory):
    """(synthetic run, path of its spatialdata-io-like store); read only."""
    root = tmp_path_factory.mktemp("hd_sdata")
    hd = write_visium_hd(root / "run", n_bins_side=32, bin_sizes=SIZES, seed=1)
    path = root / "hd.zarr"
    _write_store(hd, path)
    return hd, path


def test_the_bin_size_picks_the_table(hd_store):
    hd, path = hd_store
    adata, sdata = read_spatial(path)  # default: the 8 µm bins, as for a Space Ranger folder
    assert bin_tables(sdata) == {8: "square_008um", 16: "square_016um"}
    assert adata is sdata.tables["square_008um"]
    assert list(adata.obs_names) == list(hd.cell_abundance[8].index)
    sixteen, _ = read_spatial(path, bin_size=16)
    assert sixteen.n_obs == len(hd.cell_abundance[16]) < adata.n_obs
    assert read_spatial(path, table_key="square_016um")[0].n_obs == sixteen.n_obs
    with pytest.raises(InputError, match="has no bins of 2 µm; it has bins of 8 µm, 16 µm"):
        read_spatial(path, bin_size=2)


def test_a_bin_size_for_other_spatialdata_is_refused(tmp_path):
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    circles = ShapesModel.parse(np.array([[10.0, 10.0], [30.0, 10.0]]), geometry=0, radius=np.array([5.0, 5.0]))
    table = anndata.AnnData(X=np.ones((2, 3), np.float32), obs=pd.DataFrame(index=["a", "b"]))
    table.obs["region"] = pd.Categorical(["spots", "spots"])
    table.obs["spot_id"] = [0, 1]
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    path = tmp_path / "visium.zarr"
    sd.SpatialData(shapes={"spots": circles}, tables={"table": table}).write(path)
    with pytest.raises(InputError, match="is for Visium HD bins; .* has no table of bins"):
        read_spatial(path, bin_size=8)
    assert read_spatial(path)[0].n_obs == 2


def test_bins_open_as_squares_of_their_size_where_the_folder_puts_them(hd_store):
    hd, path = hd_store
    adata, sdata = read_spatial(path)
    layers = spatial_layer_data(adata, sdata, name="hd")
    image = [layer for layer in layers if layer[2] == "image"]
    yx, kwargs, _ = next(layer for layer in layers if layer[2] == "points")
    assert len(image) == 1
    assert kwargs["symbol"] == "square" and kwargs["size"] == pytest.approx(8 / hd.microns_per_pixel)
    folder = read_visium_hd(hd.outs, bin_size=8)  # the same bins from the Space Ranger folder
    np.testing.assert_allclose(yx, np.asarray(folder.obsm["spatial"], float)[:, ::-1], atol=1e-6)
    ctx = kwargs["metadata"]["cell2location"]
    assert ctx.extra == {SHAPE_KEY: "square", "bin_size_um": 8.0}
    # the results over them are squares too
    for stat in ("means", "q05"):
        adata.obsm[f"{stat}_cell_abundance_w_sf"] = pd.DataFrame(
            np.ones((adata.n_obs, 2)), index=adata.obs_names, columns=[f"{stat}cell_abundance_w_sf_{t}" for t in "AB"]
        )
    _, res_kwargs, _ = results_layer_data(yx, kwargs["size"], adata, ctx)
    assert res_kwargs["symbol"] == "square"
    plain = SpotContext(adata=adata, sdata=sdata)  # a SpatialData of round spots: discs
    assert "symbol" not in results_layer_data(yx, kwargs["size"], adata, plain)[1]


def test_the_reader_names_the_bin_size(hd_store):
    from napari_cell2location._reader import layer_data_from_path

    _, path = hd_store
    points = [layer for layer in layer_data_from_path(path) if layer[2] == "points"]
    assert [kwargs["name"] for _, kwargs, _ in points] == ["hd 8 µm bins"]


def test_the_cells_tab_reads_the_bin_size_from_the_table(hd_store):
    import napari

    from napari_cell2location._qt._cells_count import spot_shape_of, spot_size_um

    _, path = hd_store
    adata, sdata = read_spatial(path, bin_size=16)
    yx, kwargs, _ = next(layer for layer in spatial_layer_data(adata, sdata) if layer[2] == "points")
    layer = napari.layers.Points(yx, **kwargs)
    assert spot_shape_of(layer) == "square" and spot_size_um(layer) == 16.0


def test_polygons_other_than_squares_are_discs_of_their_area():
    circles = gpd.GeoDataFrame(geometry=[Point(x, 0.0).buffer(10.0, 64) for x in (0.0, 50.0)])
    yx, size, shape = _shape_centres(circles)
    assert shape == "circle" and size == pytest.approx(20.0, rel=1e-3)
    np.testing.assert_allclose(yx, [[0.0, 0.0], [0.0, 50.0]], atol=1e-9)
    rectangles = gpd.GeoDataFrame(geometry=[box(0, 0, 20, 5), box(30, 0, 50, 5)])
    assert _shape_centres(rectangles)[2] == "circle"
    squares = gpd.GeoDataFrame(geometry=[box(0, 0, 4, 4), box(4, 0, 8, 4)])
    assert _shape_centres(squares)[1:] == (pytest.approx(4.0), "square")


def test_cli_fits_one_bin_size_and_writes_it_into_the_store(hd_store, tmp_path):
    import spatialdata as sd

    hd, path = hd_store
    sig = tmp_path / "sig.csv"
    hd.signatures.to_csv(sig)
    out = tmp_path / "res.zarr"
    args = ["fit", str(path), "--bin-size", "16", "--signatures", str(sig), "--out", str(out)]
    assert main([*args, "--max-epochs", "2", "--quiet", "--device", "cpu", "--num-samples", "10"]) == 0
    table = sd.read_zarr(out).tables["square_016um"]
    q05 = table.obsm["q05_cell_abundance_w_sf"]
    assert q05.shape == (len(hd.cell_abundance[16]), hd.signatures.shape[1]) and np.isfinite(q05.to_numpy()).all()


def test_fit_in_napari_on_the_stores_bins(hd_store, make_napari_viewer, qtbot):
    """Open the store in napari, fit from the dock: the results are squares over the bins, written into the
    table the bins came from."""
    import os

    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("images need OpenGL (use xvfb-run)")
    from napari_cell2location._qt._dock import Cell2locationDock

    hd, path = hd_store
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cell2location")
    dock = Cell2locationDock(viewer)
    viewer.window.add_dock_widget(dock, name="Cell2location")
    assert dock.data.spots.value is viewer.layers["hd 8 µm bins"]
    dock.data.set_signatures(hd.signatures, source="test")
    dock.fit.epochs.value = 3
    assert dock.fit.run() is not None
    qtbot.waitUntil(lambda: dock.fit.worker is None, timeout=120_000)
    assert dock.fit.status.value.startswith("done"), dock.fit.status.value
    results = viewer.layers["cell abundance"]
    assert {str(s.value) for s in np.atleast_1d(results.symbol)} == {"square"}
    np.testing.assert_allclose(results.size, 8 / hd.microns_per_pixel)
    table = dock.state.spots_layer.metadata["cell2location"].sdata.tables["square_008um"]
    assert table.obsm["q05_cell_abundance_w_sf"].shape == (len(hd.cell_abundance[8]), hd.signatures.shape[1])


def test_the_data_tab_switches_bin_size(hd_store, make_napari_viewer):
    """The Data tab offers the store's bin sizes; another size adds its bins (placed as the shown ones) and
    makes them the spots to fit; going back reuses the layer already there."""
    from napari_cell2location._qt._dock import Cell2locationDock

    hd, path = hd_store
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cell2location")
    dock = Cell2locationDock(viewer)
    data = dock.data
    eight = viewer.layers["hd 8 µm bins"]
    assert not data.bin_size.native.isHidden() and list(data.bin_size.choices) == [8, 16]
    assert data.bin_size.value == 8
    data.bin_size.value = 16
    sixteen = viewer.layers["hd 16 µm bins"]
    assert data.spots.value is sixteen and dock.state.spots_layer is sixteen
    assert sixteen.visible and not eight.visible
    assert len(sixteen.data) == len(hd.cell_abundance[16]) and data.describe()["spots"] == len(sixteen.data)
    assert data.summary.value.startswith(f"{len(sixteen.data)} bins x")
    np.testing.assert_allclose(sixteen.size, 16 / hd.microns_per_pixel)
    folder = read_visium_hd(hd.outs, bin_size=16)
    np.testing.assert_allclose(sixteen.data, np.asarray(folder.obsm["spatial"], float)[:, ::-1], atol=1e-6)
    n_layers = len(viewer.layers)
    data.bin_size.value = 8
    assert data.spots.value is eight and len(viewer.layers) == n_layers and eight.visible


def test_too_many_bins_to_show_are_refused_with_the_command_line(hd_store, make_napari_viewer, monkeypatch):
    """A size with more bins than napari draws well is not read in the viewer: a notification says how many
    and gives the command line; the shown bins stay chosen."""
    from napari.utils.notifications import notification_manager

    from napari_cell2location import _bin_sizes
    from napari_cell2location._qt._dock import Cell2locationDock

    hd, path = hd_store
    assert _bin_sizes.expected_bins(len(hd.cell_abundance[16]), 16, 8) == 4 * len(hd.cell_abundance[16])
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cell2location")
    data = Cell2locationDock(viewer).data
    data.bin_size.value = 16
    sixteen = data.spots.value
    monkeypatch.setattr(_bin_sizes, "MAX_SHOWN_BINS", 100)  # the 8 µm bins are hidden now: reuse, not read
    data.bin_size.value = 8
    assert data.spots.value is viewer.layers["hd 8 µm bins"]
    viewer.layers.remove("hd 8 µm bins")
    data.spots.value = sixteen
    n_layers, n_notes = len(viewer.layers), len(notification_manager.records)
    data.bin_size.value = 8  # ~564 bins > 100: refused
    assert len(viewer.layers) == n_layers and data.spots.value is sixteen and data.bin_size.value == 16
    said = " ".join(str(r.message) for r in notification_manager.records[n_notes:])
    assert "Too many 8 µm bins" in said and "--bin-size 8" in said
