"""Visium HD (issue 13): a Space Ranger HD outs/ folder opens at the bin size asked for, in the same AnnData
contract as standard Visium, its bins drawn as squares of their true size; broken folders say what is wrong.

The folders are written by :func:`napari_cell2location.datasets.write_visium_hd` (no HD data can be
downloaded here): 64 x 64 bins of 2 µm, 0.5 µm per full-resolution pixel, 32 µm margin.
"""

from __future__ import annotations

import json
import os
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from napari_cell2location._cli import main
from napari_cell2location._layers import SpotContext, results_layer_data, spatial_layer_data
from napari_cell2location.datasets import write_visium_hd
from napari_cell2location.io import (
    InputError,
    bin_side,
    read_spatial,
    read_visium_hd,
    spatial_format,
    visium_hd_bin_sizes,
)

MPP = 0.5  # µm per full-resolution pixel of the synthetic run
MARGIN_UM = 32.0  # 2 x the largest bin


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory):
    """A synthetic HD run (read only: tests that damage it work on a copy)."""
    return write_visium_hd(tmp_path_factory.mktemp("hd") / "run", n_bins_side=64, seed=3)


@pytest.fixture
def hd_copy(hd_run, tmp_path):
    """A copy of the run's outs/ to damage, and the signatures as a CSV."""
    outs = tmp_path / "run" / "outs"
    shutil.copytree(hd_run.outs, outs)
    sig = tmp_path / "sig.csv"
    hd_run.signatures.to_csv(sig)
    return outs, sig


def _fit_cli(spatial, sig, out, *extra):
    return main(["fit", str(spatial), "--signatures", str(sig), "--out", str(out), "--max-epochs", "2",
                 "--quiet", "--device", "cpu", "--num-samples", "10", *extra])  # fmt: skip


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("size", [2, 8, 16])
def test_each_bin_size_reads_as_the_visium_contract(hd_run, size):
    adata = read_visium_hd(hd_run.outs, bin_size=size)
    truth = hd_run.cell_abundance[size]
    assert adata.shape == (len(truth), 100) and list(adata.obs_names) == list(truth.index)
    assert sparse.issparse(adata.X) and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data))  # raw integer counts
    assert (adata.obs["in_tissue"] == 1).all()
    # bin centres in full-resolution (x, y) pixels, from the array indices
    expected = (MARGIN_UM + (adata.obs[["array_col", "array_row"]].to_numpy() + 0.5) * size) / MPP
    np.testing.assert_allclose(adata.obsm["spatial"], expected)
    entry = adata.uns["spatial"]["run"]
    assert entry["scalefactors"]["bin_size_um"] == size
    assert entry["scalefactors"]["bin_side_fullres"] == bin_side(adata) == size / MPP
    assert entry["images"]["hires"].shape == hd_run.image.shape
    assert set(adata.obs_names.str.slice(0, 8)) == {f"s_{size:03d}um_"}


def test_coarse_bins_are_sums_of_the_fine_ones(hd_run):
    fine, coarse = read_visium_hd(hd_run.outs, bin_size=2), read_visium_hd(hd_run.outs, bin_size=16)
    assert fine.X.sum() == coarse.X.sum() > 0
    # each 16 µm bin = the 64 bins of 2 µm it covers, gene by gene
    key = lambda a, k: a.obs["array_row"].to_numpy() // k * 10_000 + a.obs["array_col"].to_numpy() // k  # noqa: E731
    fine_key, coarse_key = key(fine, 8), key(coarse, 1)
    parent = pd.Index(coarse_key).get_indexer(fine_key)
    assert (parent >= 0).all()
    pool = sparse.csr_matrix((np.ones(fine.n_obs), (parent, np.arange(fine.n_obs))), shape=(coarse.n_obs, fine.n_obs))
    np.testing.assert_array_equal((pool @ fine.X).toarray(), coarse.X.toarray())
    assert hd_run.cell_abundance[16].to_numpy().sum() == len(hd_run.cells) == hd_run.cell_abundance[2].to_numpy().sum()


def test_every_way_to_point_at_an_hd_run(hd_run):
    run, binned = hd_run.outs.parent, hd_run.outs / "binned_outputs"
    for path in (run, hd_run.outs, binned, hd_run.bin_folder(16)):
        assert spatial_format(path) == "visium_hd", path
    assert visium_hd_bin_sizes(run) == [2, 8, 16]
    assert read_spatial(run)[0].uns["spatial"]["run"]["scalefactors"]["bin_size_um"] == 8  # the default
    assert read_spatial(binned, bin_size=2)[0].n_obs == len(hd_run.cell_abundance[2])
    adata, sdata = read_spatial(hd_run.bin_folder(16))  # a bin folder opens its own bins
    assert sdata is None and adata.n_obs == len(hd_run.cell_abundance[16])
    assert read_visium_hd(hd_run.bin_folder(16), bin_size="square_008um").n_obs == len(hd_run.cell_abundance[8])


def test_bins_land_on_the_tissue_of_the_image(hd_run):
    """In-tissue bins sit on stained pixels of the hires image, the others (from the positions) on glass."""
    adata = read_visium_hd(hd_run.outs, bin_size=16)
    image = adata.uns["spatial"]["run"]["images"]["hires"]
    scalef = adata.uns["spatial"]["run"]["scalefactors"]["tissue_hires_scalef"]
    positions = pd.read_parquet(hd_run.bin_folder(16) / "spatial" / "tissue_positions.parquet")
    rc = np.rint(positions[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy() * scalef).astype(int)
    glass = (image[rc[:, 0], rc[:, 1]] == (242, 240, 245)).all(1)
    assert not glass[positions["in_tissue"].to_numpy() == 1].any()
    assert glass[positions["in_tissue"].to_numpy() == 0].all()


# --------------------------------------------------------------------------- layers
def test_layers_draw_bins_as_squares_of_their_true_size(hd_run):
    adata = read_visium_hd(hd_run.outs, bin_size=8)
    layers = spatial_layer_data(adata, name="bins")
    (image, ikw, _), (yx, kwargs, kind) = layers
    assert kind == "points" and kwargs["symbol"] == "square" and kwargs["size"] == 8 / MPP
    np.testing.assert_allclose(yx, adata.obsm["spatial"][:, ::-1])
    np.testing.assert_allclose(
        np.diag(ikw["affine"])[:2], 1 / adata.uns["spatial"]["run"]["scalefactors"]["tissue_hires_scalef"]
    )
    ctx = kwargs["metadata"]["cell2location"]
    _, rkw, _ = results_layer_data(yx, np.full(len(yx), kwargs["size"]), adata, ctx)
    assert rkw["symbol"] == "square"
    # standard Visium spots stay discs
    from napari_cell2location.datasets import synthetic_visium

    spots = synthetic_visium(n_spots=20, n_genes=10, n_cell_types=2, n_batches=1, image=False).adata
    _, skw, _ = spatial_layer_data(spots)[-1]
    assert "symbol" not in skw and bin_side(spots) is None
    assert "symbol" not in results_layer_data(np.zeros((20, 2)), 5.0, spots, SpotContext(spots))[1]


def test_napari_opens_hd_bins_as_squares(make_napari_viewer, hd_run):
    pytest.importorskip("pytestqt")
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("images need OpenGL (use xvfb-run)")
    viewer = make_napari_viewer()
    viewer.open(str(hd_run.outs.parent), plugin="napari-cell2location")
    assert sorted(type(layer).__name__ for layer in viewer.layers) == ["Image", "Points"]
    bins = viewer.layers["run 8 µm bins"]
    assert {str(s.value) for s in np.atleast_1d(bins.symbol)} == {"square"}
    np.testing.assert_allclose(bins.size, 8 / MPP)
    viewer.open(str(hd_run.bin_folder(16)), plugin="napari-cell2location")  # another size: its bin folder
    coarse = viewer.layers["run 16 µm bins"]
    np.testing.assert_allclose(coarse.size, 16 / MPP)
    assert len(coarse.data) == len(hd_run.cell_abundance[16])


def test_the_data_tab_reads_another_bin_size_of_the_folder(make_napari_viewer, hd_run):
    from napari_cell2location._qt._dock import Cell2locationDock

    viewer = make_napari_viewer()
    viewer.open(str(hd_run.outs.parent), plugin="napari-cell2location")
    data = Cell2locationDock(viewer).data
    assert list(data.bin_size.choices) == [2, 8, 16] and data.bin_size.value == 8
    data.bin_size.value = 16
    coarse = data.spots.value
    assert coarse.name == "run 16 µm bins" and len(coarse.data) == len(hd_run.cell_abundance[16])
    np.testing.assert_allclose(coarse.size, 16 / MPP)
    ref = read_visium_hd(hd_run.outs, bin_size=16)
    np.testing.assert_allclose(coarse.data, np.asarray(ref.obsm["spatial"], float)[:, ::-1], atol=1e-6)
    assert not viewer.layers["run 8 µm bins"].visible


# --------------------------------------------------------------------------- command line
def test_cli_fits_an_hd_folder_at_the_bin_size_asked(hd_copy, tmp_path, capsys):
    outs, sig = hd_copy
    out = tmp_path / "res.h5ad"
    assert _fit_cli(outs.parent, sig, out, "--bin-size", "16", "--max-epochs", "20") == 0
    res = anndata.read_h5ad(out)
    assert res.n_obs == read_visium_hd(outs, bin_size=16).n_obs
    assert res.uns["spatial"]["run"]["scalefactors"]["bin_size_um"] == 16
    for k in ("means", "stds", "q05", "q95"):
        assert list(res.obsm[f"{k}_cell_abundance_w_sf"].columns) == [
            f"{k}cell_abundance_w_sf_{t}" for t in sig.read_text().splitlines()[0].split(",")[1:]
        ]
    assert "wrote" in capsys.readouterr().out
    assert _fit_cli(outs, sig, tmp_path / "o.h5ad", "--bin-size", "5") == 2  # not written: one line, its sizes
    assert "has no 5 µm bins (square_005um/); it has 2 µm, 8 µm, 16 µm" in _one_line_error(capsys)


# --------------------------------------------------------------------------- broken folders
def test_broken_hd_folders_say_which_file_and_what_to_do(hd_copy, tmp_path, capsys):
    outs, sig = hd_copy
    spatial8 = outs / "binned_outputs" / "square_008um" / "spatial"
    positions, scalefactors = spatial8 / "tissue_positions.parquet", spatial8 / "scalefactors_json.json"
    saved = {p: p.read_bytes() for p in (positions, scalefactors)}
    no_column = tmp_path / "no_column.parquet"
    pd.read_parquet(positions).drop(columns="pxl_row_in_fullres").to_parquet(no_column)
    cases = [
        (positions, None, "tissue_positions.parquet' is missing: it holds where each bin is"),
        (positions, b"\x00garbage" * 50, "tissue_positions.parquet' is not a readable Visium HD tissue positions"),
        (positions, no_column.read_bytes(), "lacks the column(s) ['pxl_row_in_fullres']"),
        (scalefactors, b"{not json", "scalefactors_json.json' is not a readable scale factors file (JSON)"),
        (scalefactors, b'{"microns_per_pixel": "small"}', "microns_per_pixel is 'small'"),
    ]
    for path, payload, says in cases:
        path.unlink() if payload is None else path.write_bytes(payload)
        with pytest.raises(InputError) as err:
            read_spatial(outs)
        assert says in str(err.value)
        assert _fit_cli(outs, sig, tmp_path / "o.h5ad") == 2
        assert says in _one_line_error(capsys)
        assert not (tmp_path / "o.h5ad").exists()
        path.write_bytes(saved[path])
    assert read_spatial(outs)[0].n_obs > 0  # restored

    with pytest.raises(InputError, match="has no 5 µm bins"):
        read_spatial(outs, bin_size=5)
    with pytest.raises(InputError, match="bin_size must be a whole number of µm"):
        read_visium_hd(outs, bin_size=2.5)
    (outs / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InputError, match=r"square_008um' has no count matrix \(filtered_feature_bc_matrix.h5\)"):
        read_spatial(outs)
    for folder in (outs / "binned_outputs").iterdir():
        shutil.rmtree(folder)
    with pytest.raises(InputError, match="binned_outputs' holds no bin folder"):
        read_spatial(outs.parent)
    (outs / "binned_outputs").rmdir()
    assert spatial_format(outs) == "visium_hd"  # still claimed (HD scale factors), to say what is missing
    with pytest.raises(InputError, match="is Visium HD output without its binned_outputs/ folder"):
        read_spatial(outs)


def test_a_bin_size_for_other_data_is_an_error(tmp_path, make_tiny):
    adata, _, _ = make_tiny(n_obs=10, n_vars=12, n_factors=2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="a bin size .8. is for Visium HD output"):
        read_spatial(tmp_path / "a.h5ad", bin_size=8)


@pytest.mark.parametrize("image", ["missing", "garbage"])
def test_hd_without_a_readable_image_still_opens_the_bins(hd_copy, caplog, image):
    outs, _ = hd_copy
    pngs = list(outs.rglob("tissue_*_image.png"))
    for png in pngs:
        png.unlink() if image == "missing" else png.write_bytes(b"not a png")
    adata = read_visium_hd(outs, bin_size=16)
    assert adata.n_obs > 0 and adata.uns["spatial"]["run"]["images"] == {}
    assert "open without" in caplog.text
    _, kwargs, _ = spatial_layer_data(adata)[-1]
    assert kwargs["symbol"] == "square"


def test_reader_claims_a_broken_hd_folder_and_says_why(hd_copy):
    pytest.importorskip("napari")
    from napari.utils.notifications import notification_manager

    from napari_cell2location._reader import NO_LAYERS, napari_get_reader

    outs, _ = hd_copy
    (outs / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json").write_text("{")
    reader = napari_get_reader(str(outs))
    assert reader is not None
    n = len(notification_manager.records)
    assert reader(str(outs)) == NO_LAYERS
    messages = [str(r.message) for r in notification_manager.records[n:]]
    assert len(messages) == 1 and "scalefactors_json.json' is not a readable scale factors file" in messages[0]


# --------------------------------------------------------------------------- the generator
def test_write_visium_hd_refuses_sizes_that_do_not_nest(tmp_path):
    with pytest.raises(ValueError, match="divide the largest"):
        write_visium_hd(tmp_path / "a", bin_sizes=(2, 6, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        write_visium_hd(tmp_path / "b", n_bins_side=20)
    hd = write_visium_hd(tmp_path / "c", n_bins_side=8, bin_sizes=(8,), seed=1)  # one size only
    assert visium_hd_bin_sizes(hd.outs) == [8]
    positions = pd.read_parquet(hd.bin_folder(8) / "spatial" / "tissue_positions.parquet")
    assert len(positions) == 64 and list(positions.columns)[:4] == ["barcode", "in_tissue", "array_row", "array_col"]
    assert json.loads((hd.bin_folder(8) / "spatial" / "scalefactors_json.json").read_text())["bin_size_um"] == 8
