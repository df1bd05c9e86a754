"""Broken files, as real data arrive (issue 14): every reader says what is wrong in one line, the CLI exits
2 without a traceback, napari shows a notification, and results already on disk are never clobbered.

For each format the same damage is applied to a good file: garbage bytes, text (an HTML error page, a
failed download), a copy cut short, an empty file or folder, a member of the wrong type.
"""

from __future__ import annotations

import json
import os
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import io as sio
from scipy import sparse

from napari_cell2location._cli import main
from napari_cell2location.io import InputError, read_signatures, read_spatial, write_results

GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
HTML = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _damage(good, bad, how: str):
    """Write a damaged copy of the file ``good`` to ``bad``. A text table is cut just after a separator in
    mid-row (a table cut at a line break is only a shorter table: nothing can tell)."""
    data = open(good, "rb").read()
    cut = len(data) // 2
    if str(good).endswith(".csv"):
        cut = data.rfind(b",", 0, cut) + 1
    payload = {"garbage": GARBAGE, "text": HTML, "truncated": data[:cut], "empty": b""}[how]
    with open(bad, "wb") as fh:
        fh.write(payload)
    return bad


@pytest.fixture
def good(tmp_path, make_tiny):
    """Good inputs: spatial .h5ad, signatures .csv and a cell2location reference .h5ad."""
    adata, sig, _ = make_tiny(n_obs=30, n_vars=40, n_factors=3)
    adata.obsm["spatial"] = np.random.default_rng(1).uniform(0, 500, (adata.n_obs, 2))
    paths = {"spatial": tmp_path / "spatial.h5ad", "sig": tmp_path / "sig.csv", "ref": tmp_path / "ref.h5ad"}
    adata.write_h5ad(paths["spatial"])
    sig.to_csv(paths["sig"])
    ref = anndata.AnnData(np.ones((5, sig.shape[0]), dtype=np.float32))
    ref.var_names = sig.index
    ref.varm["means_per_cluster_mu_fg"] = sig.set_axis([f"means_per_cluster_mu_fg_{c}" for c in sig.columns], axis=1)
    ref.write_h5ad(paths["ref"])
    return paths


def _fit_cli(spatial, sig, out, *extra):
    return main(["fit", str(spatial), "--signatures", str(sig), "--out", str(out), "--max-epochs", "2",
                 "--quiet", "--device", "cpu", *extra])  # fmt: skip


def _one_line_error(capsys, command="fit"):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"napari-cell2location {command}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- spatial .h5ad
@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("garbage", "is not an .h5ad: an .h5ad is an HDF5 file, this is binary data"),
        ("text", "this is text starting with '<html><head><title>404 Not Found"),
        ("truncated", "is truncated"),
        ("empty", "this is empty (0 bytes)"),
    ],
)
def test_broken_spatial_h5ad(good, tmp_path, capsys, how, says):
    bad = _damage(good["spatial"], tmp_path / "bad.h5ad", how)
    with pytest.raises(InputError, match="bad.h5ad") as err:
        read_spatial(bad)
    assert says in str(err.value)
    out = tmp_path / "results.h5ad"
    out.write_bytes(b"previous results")
    assert _fit_cli(bad, good["sig"], out) == 2
    assert says in _one_line_error(capsys)
    assert out.read_bytes() == b"previous results"


def test_h5ad_with_wrong_members(good, tmp_path, capsys):
    import h5py

    no_x = tmp_path / "no_x.h5ad"
    shutil.copy(good["spatial"], no_x)
    with h5py.File(no_x, "a") as f:
        del f["X"]
    with pytest.raises(InputError, match="no_x.h5ad' holds no count matrix: its AnnData has no X and no layers"):
        read_spatial(no_x)
    wrong = tmp_path / "wrong_obs.h5ad"
    shutil.copy(good["spatial"], wrong)
    with h5py.File(wrong, "a") as f:  # obs must be a group (a table), here it is an array
        del f["obs"]
        f["obs"] = np.arange(3)
    with pytest.raises(InputError, match=r"wrong_obs.h5ad' is not a readable spatial counts \.h5ad"):
        read_spatial(wrong)
    assert _fit_cli(wrong, good["sig"], tmp_path / "o.h5ad") == 2
    assert "wrong_obs.h5ad" in _one_line_error(capsys)
    assert not (tmp_path / "o.h5ad").exists()


# --------------------------------------------------------------------------- signatures
@pytest.mark.parametrize(
    ("name", "how", "says"),
    [
        ("sig.csv", "garbage", "is not a readable signatures table"),
        ("sig.csv", "empty", "is not a readable signatures table"),
        ("sig.csv", "truncated", "empty value"),
        ("sig.h5ad", "garbage", "is not an .h5ad"),
        ("sig.h5ad", "truncated", "is truncated"),
        ("sig.h5ad", "text", "this is text starting with"),
    ],
)
def test_broken_signatures(good, tmp_path, capsys, name, how, says):
    source = good["sig"] if name.endswith(".csv") else good["ref"]
    bad = _damage(source, tmp_path / name, how)
    with pytest.raises(InputError, match=says) as err:
        read_signatures(bad)
    assert name in str(err.value)
    out = tmp_path / "results.h5ad"
    out.write_bytes(b"previous results")
    assert _fit_cli(good["spatial"], bad, out) == 2
    assert name in _one_line_error(capsys)
    assert out.read_bytes() == b"previous results"


def test_non_numeric_signatures_and_wrong_member(good, tmp_path):
    table = tmp_path / "words.csv"
    table.write_text("gene,TypeA\nG1,high\nG2,low\n")
    with pytest.raises(InputError, match="non-numeric column"):
        read_signatures(table)
    ref = anndata.read_h5ad(good["ref"])
    ref.varm["means_per_cluster_mu_fg"] = np.ones((ref.n_vars, 3))  # an array and no factor_names to name it
    ref.write_h5ad(tmp_path / "nameless.h5ad")
    with pytest.raises(InputError, match="no uns\\['mod'\\]\\['factor_names'\\]"):
        read_signatures(tmp_path / "nameless.h5ad")


# --------------------------------------------------------------------------- SpatialData zarr
@pytest.fixture
def zarr_store(tmp_path):
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=40, n_genes=30, n_cell_types=3, seed=0)
    path = tmp_path / "section.zarr"
    data.to_spatialdata().write(path)
    return path, data.signatures


def test_broken_spatialdata_zarr(zarr_store, tmp_path, capsys):
    store, signatures = zarr_store
    sig = tmp_path / "sig.csv"
    signatures.to_csv(sig)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(InputError, match="empty.zarr' is not a readable zarr store"):
        read_spatial(empty)
    import spatialdata

    sdata = spatialdata.read_zarr(store)
    del sdata.tables["table"]
    no_table = tmp_path / "no_table.zarr"
    sdata.write(no_table)  # images and shapes, no counts
    with pytest.raises(InputError, match="no_table.zarr'\\) has no table"):
        read_spatial(no_table)
    missing = tmp_path / "missing.zarr"
    shutil.copytree(store, missing)
    shutil.rmtree(missing / "tables")  # listed in the store's metadata, gone from the disk
    with pytest.raises(InputError, match="missing.zarr' is not a readable SpatialData zarr store"):
        read_spatial(missing)
    garbage = tmp_path / "garbage.zarr"
    shutil.copytree(store, garbage)
    (garbage / "zarr.json").write_bytes(GARBAGE)
    with pytest.raises(InputError, match="garbage.zarr' is not a readable"):
        read_spatial(garbage)
    cut = tmp_path / "cut.zarr"
    shutil.copytree(store, cut)
    for chunk in (cut / "tables" / "table" / "X").rglob("*"):
        if chunk.is_file() and chunk.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
            chunk.write_bytes(chunk.read_bytes()[:3])  # the counts' chunks cut short
    with pytest.raises(InputError, match="cut.zarr"):
        read_spatial(cut)[0].X.sum()  # read lazily or eagerly, the damage is reported with the store
    for bad in (empty, no_table, missing, garbage):
        assert _fit_cli(bad, sig, tmp_path / "o.h5ad") == 2
        assert bad.name in _one_line_error(capsys)


# --------------------------------------------------------------------------- Space Ranger folder
@pytest.fixture
def spaceranger(tmp_path):
    """A small, complete Space Ranger outs/ folder (Matrix Market counts, positions, scale factors, image)."""
    from skimage.io import imsave

    rng = np.random.default_rng(0)
    n_spots, n_genes = 25, 30
    outs = tmp_path / "sample" / "outs"
    matrix = outs / "filtered_feature_bc_matrix"
    spatial = outs / "spatial"
    matrix.mkdir(parents=True)
    spatial.mkdir()
    counts = sparse.coo_matrix(rng.poisson(3, (n_genes, n_spots)).astype(float))
    sio.mmwrite(matrix / "matrix.mtx", counts)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n_spots)]
    (matrix / "barcodes.tsv").write_text("\n".join(barcodes) + "\n")
    (matrix / "features.tsv").write_text("\n".join(f"ENSG{i:05d}\tGene{i}\tGene Expression" for i in range(n_genes)))
    rows, cols = np.divmod(np.arange(n_spots), 5)
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": rows, "array_col": cols,
                  "pxl_row_in_fullres": 100 + 100 * rows, "pxl_col_in_fullres": 100 + 100 * cols}
                 ).to_csv(spatial / "tissue_positions.csv", index=False)  # fmt: skip
    (spatial / "scalefactors_json.json").write_text(
        json.dumps({"tissue_lowres_scalef": 0.1, "tissue_hires_scalef": 0.3, "spot_diameter_fullres": 55.0})
    )
    imsave(spatial / "tissue_lowres_image.png", rng.integers(0, 255, (70, 70, 3), dtype=np.uint8))
    signatures = pd.DataFrame(rng.gamma(1, 1, (n_genes, 3)), index=[f"Gene{i}" for i in range(n_genes)],
                              columns=["A", "B", "C"])  # fmt: skip
    sig = tmp_path / "sig.csv"
    signatures.to_csv(sig)
    return outs, sig


def test_spaceranger_without_positions_or_with_broken_files(spaceranger, capsys):
    outs, sig = spaceranger
    adata, _ = read_spatial(outs)
    assert adata.n_obs == 25 and adata.uns["spatial"]["sample"]["images"]["lowres"].shape == (70, 70, 3)
    positions = outs / "spatial" / "tissue_positions.csv"
    scalefactors = outs / "spatial" / "scalefactors_json.json"
    matrix = outs / "filtered_feature_bc_matrix" / "matrix.mtx"
    saved = {p: p.read_bytes() for p in (positions, scalefactors, matrix)}
    cases = [
        (positions, None, "has no tissue positions file"),
        (positions, GARBAGE, "tissue_positions.csv"),
        (scalefactors, b"{not json", "scalefactors_json.json' is not a readable scale factors file (JSON)"),
        (scalefactors, b'{"tissue_lowres_scalef": "ten"}', "is not a Space Ranger scale factors file"),
        (matrix, GARBAGE, "matrix.mtx' is not a readable Matrix Market count matrix"),
        (matrix, b"", "matrix.mtx' is not a readable Matrix Market count matrix"),
    ]
    for path, payload, says in cases:
        if payload is None:
            path.unlink()
        else:
            path.write_bytes(payload)
        with pytest.raises(InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
            read_spatial(outs)
        out = outs.parent / "o.h5ad"
        assert _fit_cli(outs, sig, out) == 2
        assert says in _one_line_error(capsys)
        assert not out.exists()
        path.write_bytes(saved[path])


@pytest.mark.parametrize("image", ["missing", "garbage"])
def test_spaceranger_image_missing_or_broken_still_opens_the_spots(spaceranger, caplog, image):
    outs, _ = spaceranger
    png = outs / "spatial" / "tissue_lowres_image.png"
    if image == "missing":
        png.unlink()
    else:
        png.write_bytes(GARBAGE)
    adata, _ = read_spatial(outs)
    assert adata.n_obs == 25 and adata.uns["spatial"]["sample"]["images"] == {}
    assert "the spots open without" in caplog.text


# --------------------------------------------------------------------------- outputs are never clobbered
def test_failed_or_interrupted_write_leaves_the_old_results(good, tmp_path, monkeypatch):
    adata = anndata.read_h5ad(good["spatial"])
    out = tmp_path / "results.h5ad"
    write_results(adata, out)
    before = out.read_bytes()

    def half_then(exc):
        def write(self, filename, *args, **kwargs):
            with open(filename, "wb") as fh:
                fh.write(before[: len(before) // 3])  # a partial file, then the failure
            raise exc

        return write

    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        monkeypatch.setattr(anndata.AnnData, "write_h5ad", half_then(exc))
        with pytest.raises(type(exc)):
            write_results(adata, out)
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.h5ad", *(p.name for p in good.values())])


def test_failed_zarr_write_leaves_the_old_store(zarr_store, tmp_path, monkeypatch):
    import spatialdata

    store, _ = zarr_store
    sdata = spatialdata.read_zarr(store)
    out = tmp_path / "results.zarr"
    write_results(sdata.tables["table"], out, sdata=sdata)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    sdata.tables["table"].obs["changed"] = 1.0

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spatialdata.SpatialData, "write", fail)
    for target in (out, store):  # sdata now lives in out: its table rewritten in place, then a whole new store
        with pytest.raises(OSError):
            write_results(sdata.tables["table"], target, sdata=sdata)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert "changed" not in spatialdata.read_zarr(store).tables["table"].obs
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".table" in p.name]


def test_cli_refuses_an_unwritable_output_before_fitting(good, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert _fit_cli(good["spatial"], good["sig"], blocker / "results.h5ad") == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["reference", str(good["ref"]), "--labels-key", "x", "--out", str(blocker / "sig.csv")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys, "reference")


def test_saved_model_broken_files(good, tmp_path, monkeypatch):
    import torch

    from napari_cell2location import Cell2location

    adata = anndata.read_h5ad(good["spatial"])
    mod = Cell2location(adata, read_signatures(good["sig"]))
    mod.train(max_epochs=2, progress_bar=False, device="cpu")
    folder = mod.save(tmp_path / "model")
    params = (folder / mod.PARAMS_FILE).read_bytes()
    monkeypatch.setattr(
        torch, "save", lambda obj, f: (open(f, "wb").write(b"half"), (_ for _ in ()).throw(OSError("disk")))
    )
    with pytest.raises(OSError):
        mod.save(folder, overwrite=True)
    assert (folder / mod.PARAMS_FILE).read_bytes() == params  # the saved model is still whole
    monkeypatch.undo()
    (folder / "attr.json").write_text("{broken")
    with pytest.raises(InputError, match="attr.json' is not a readable saved Cell2location description"):
        Cell2location.load(folder, adata)
    mod.save(folder, overwrite=True)
    (folder / mod.PARAMS_FILE).write_bytes(GARBAGE)
    with pytest.raises(InputError, match="is not a readable saved Cell2location parameter file"):
        Cell2location.load(folder, adata)


# --------------------------------------------------------------------------- napari: a notification
def test_reader_shows_a_notification_and_opens_nothing(good, tmp_path):
    pytest.importorskip("napari")
    from napari.utils.notifications import notification_manager

    from napari_cell2location._reader import NO_LAYERS, napari_get_reader

    bad = _damage(good["spatial"], tmp_path / "bad.h5ad", "truncated")
    reader = napari_get_reader(str(bad))
    assert reader is not None  # claimed, so that the user hears what is wrong with it
    n = len(notification_manager.records)
    assert reader(str(bad)) == NO_LAYERS
    messages = [str(r.message) for r in notification_manager.records[n:]]
    assert len(messages) == 1 and "bad.h5ad' is truncated" in messages[0]
    assert messages[0].split("\n")[0] == "Cannot open this."  # the toast's line; the reason under it
    assert napari_get_reader(str(good["ref"])) is not None  # a single-cell table: claimed, to say where it goes
    assert os.path.exists(good["spatial"])
