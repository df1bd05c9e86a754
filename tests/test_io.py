"""Tests of the file boundary: napari_cell2location.io read_signatures / read_spatial / write_results."""

from __future__ import annotations

import datetime
import os

import anndata
import numpy as np
import pandas as pd
import pytest

from napari_cell2location.io import read_signatures, read_spaceranger, read_spatial, spatial_format, write_results

GENES = [f"Gene{i}" for i in range(6)]
TYPES = ["TypeA", "TypeB", "T cell"]


@pytest.fixture
def signatures() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.gamma(2.0, 1.0, size=(len(GENES), len(TYPES))), index=GENES, columns=TYPES)


def _results_adata(n_obs: int = 4) -> anndata.AnnData:
    """A small spatial AnnData carrying results in cell2location's layout."""
    rng = np.random.default_rng(1)
    obs_names = [f"spot{i}" for i in range(n_obs)]
    adata = anndata.AnnData(
        X=rng.poisson(3.0, size=(n_obs, len(GENES))).astype(np.float32),
        obs=pd.DataFrame({"sample": pd.Categorical(["a", "b"] * (n_obs // 2))}, index=obs_names),
        var=pd.DataFrame(index=GENES),
    )
    adata.obsm["spatial"] = rng.uniform(0, 100, size=(n_obs, 2))
    for k in ("means", "stds", "q05", "q95"):
        adata.obsm[f"{k}_cell_abundance_w_sf"] = pd.DataFrame(
            rng.gamma(2.0, 1.0, size=(n_obs, len(TYPES))),
            index=obs_names,
            columns=[f"{k}cell_abundance_w_sf_{ct}" for ct in TYPES],
        )
    adata.uns["mod"] = {
        "model_name": "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
        "date": datetime.date(2026, 11, 25).isoformat(),
        "factor_names": list(TYPES),
        "var_names": list(GENES),
        "obs_names": obs_names,
        "post_sample_means": {"w_sf": rng.gamma(2.0, 1.0, size=(n_obs, len(TYPES))), "m_g": np.ones((1, 6))},
        "post_sample_q05": {"w_sf": rng.gamma(2.0, 1.0, size=(n_obs, len(TYPES)))},
        "training": {"history": np.linspace(10.0, 1.0, 5), "settings": {"lr": 0.002, "batch_size": None}},
    }
    return adata


def _assert_results_equal(got: anndata.AnnData, expected: anndata.AnnData) -> None:
    assert list(got.obs_names) == list(expected.obs_names)
    assert list(got.var_names) == list(expected.var_names)
    np.testing.assert_allclose(np.asarray(got.X), np.asarray(expected.X))
    for key, df in expected.obsm.items():
        if isinstance(df, pd.DataFrame):
            pd.testing.assert_frame_equal(got.obsm[key], df)
        else:
            np.testing.assert_allclose(got.obsm[key], df)
    mod, exp = got.uns["mod"], expected.uns["mod"]
    assert mod["model_name"] == exp["model_name"]
    assert mod["date"] == exp["date"]
    for key in ("factor_names", "var_names", "obs_names"):
        assert [str(v) for v in mod[key]] == list(exp[key])
    for slot in ("post_sample_means", "post_sample_q05"):
        assert set(mod[slot]) == set(exp[slot])
        for site, value in exp[slot].items():
            np.testing.assert_allclose(mod[slot][site], value)
    np.testing.assert_allclose(mod["training"]["history"], exp["training"]["history"])
    assert mod["training"]["settings"]["lr"] == pytest.approx(0.002)


# --------------------------------------------------------------------------------------------
# read_signatures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "sep"), [("sig.csv", ","), ("sig.tsv", "\t"), ("sig.csv.gz", ",")])
def test_read_signatures_table(tmp_path, signatures, name, sep):
    path = tmp_path / name
    signatures.to_csv(path, sep=sep)
    got = read_signatures(path)
    pd.testing.assert_frame_equal(got, signatures)
    assert got.dtypes.eq(np.float64).all()


def test_read_signatures_integer_table_becomes_float(tmp_path):
    df = pd.DataFrame({"A": [1, 2], "B": [3, 4]}, index=["g1", "g2"])
    df.to_csv(tmp_path / "int.csv")
    got = read_signatures(str(tmp_path / "int.csv"))
    assert got.dtypes.eq(np.float64).all()
    assert list(got.index) == ["g1", "g2"]


def test_read_signatures_h5ad_varm_dataframe(tmp_path, signatures):
    ref = anndata.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))
    # the original writes columns with a prefix, and possibly in a different order than factor_names
    varm = signatures[TYPES[::-1]].copy()
    varm.columns = [f"means_per_cluster_mu_fg_{ct}" for ct in varm.columns]
    ref.varm["means_per_cluster_mu_fg"] = varm
    ref.uns["mod"] = {"factor_names": list(TYPES)}
    ref.write_h5ad(tmp_path / "ref.h5ad")

    got = read_signatures(tmp_path / "ref.h5ad")
    pd.testing.assert_frame_equal(got, signatures)


def test_read_signatures_h5ad_varm_array(tmp_path, signatures):
    ref = anndata.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))
    ref.varm["means_per_cluster_mu_fg"] = signatures.to_numpy()
    ref.uns["mod"] = {"factor_names": list(TYPES)}
    ref.write_h5ad(tmp_path / "ref.h5ad")

    pd.testing.assert_frame_equal(read_signatures(tmp_path / "ref.h5ad"), signatures)


def test_read_signatures_h5ad_var_columns(tmp_path, signatures):
    var = signatures.copy()
    var.columns = [f"means_per_cluster_mu_fg_{ct}" for ct in TYPES]
    var["n_cells"] = 3  # unrelated var column, ignored
    ref = anndata.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32), var=var)
    ref.write_h5ad(tmp_path / "ref.h5ad")

    pd.testing.assert_frame_equal(read_signatures(tmp_path / "ref.h5ad"), signatures)


def test_read_signatures_h5ad_array_without_names(tmp_path, signatures):
    ref = anndata.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))
    ref.varm["means_per_cluster_mu_fg"] = signatures.to_numpy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    with pytest.raises(ValueError, match="factor_names"):
        read_signatures(tmp_path / "ref.h5ad")


def test_read_signatures_h5ad_without_signatures(tmp_path):
    ref = anndata.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))
    ref.varm["PCs"] = np.zeros((len(GENES), 2))
    ref.write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(ValueError, match=r"means_per_cluster_mu_fg.*PCs"):
        read_signatures(tmp_path / "plain.h5ad")


def test_read_signatures_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_signatures(tmp_path / "missing.csv")
    (tmp_path / "sig.xlsx").write_bytes(b"not really excel")
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx'.*\.csv"):
        read_signatures(tmp_path / "sig.xlsx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        read_signatures(tmp_path / "folder")


def test_read_signatures_non_numeric_or_empty(tmp_path):
    pd.DataFrame({"A": [1.0, 2.0], "B": ["x", "y"]}, index=["g1", "g2"]).to_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="non-numeric column.*'B'"):
        read_signatures(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="Cannot parse|empty"):
        read_signatures(tmp_path / "empty.csv")


def test_read_signatures_warns_on_likely_transposed(tmp_path, signatures, caplog):
    signatures.T.to_csv(tmp_path / "transposed.csv")
    with caplog.at_level("WARNING", logger="napari_cell2location.io._read"):
        got = read_signatures(tmp_path / "transposed.csv")
    assert got.shape == (len(TYPES), len(GENES))
    assert "Transpose" in caplog.text


# --------------------------------------------------------------------------------------------
# read_spatial / write_results: AnnData
# --------------------------------------------------------------------------------------------


def test_h5ad_round_trip_keeps_results(tmp_path):
    adata = _results_adata()
    adata.uns["mod"]["when"] = datetime.datetime(2026, 11, 25, 12, 30)  # not storable as is
    adata.uns["mod"]["quantiles"] = (0.05, 0.5, 0.95)  # tuple: not storable as is
    adata.uns["mod"]["mixed"] = ["a", 1, None]  # mixed list: not storable as is
    adata.uns["mod"]["optional"] = None

    out = write_results(adata, tmp_path / "nested" / "dir" / "results.h5ad")
    assert out.is_file()
    # the caller's object is unchanged
    assert isinstance(adata.uns["mod"]["when"], datetime.datetime)
    assert isinstance(adata.uns["mod"]["quantiles"], tuple)

    got, sdata = read_spatial(out)
    assert sdata is None
    _assert_results_equal(got, adata)
    assert got.uns["mod"]["when"] == "2026-11-25T12:30:00"
    np.testing.assert_allclose(got.uns["mod"]["quantiles"], [0.05, 0.5, 0.95])
    assert [str(v) for v in got.uns["mod"]["mixed"]] == ["a", "1", ""]
    assert got.uns["mod"]["optional"] is None
    assert list(got.obsm["q05_cell_abundance_w_sf"].columns) == [f"q05cell_abundance_w_sf_{ct}" for ct in TYPES]


def test_anndata_zarr_round_trip(tmp_path):
    adata = _results_adata()
    out = write_results(adata, tmp_path / "results.zarr")
    got, sdata = read_spatial(out)
    assert sdata is None
    _assert_results_equal(got, adata)
    # writing again over an existing store works
    write_results(adata, out)
    _assert_results_equal(read_spatial(out)[0], adata)


def test_write_results_bad_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.h5ad or \.zarr"):
        write_results(_results_adata(), tmp_path / "results.csv")


def test_read_spatial_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_spatial(tmp_path / "missing.h5ad")
    (tmp_path / "counts.mtx").write_text("%%MatrixMarket")
    with pytest.raises(ValueError, match=r"unknown format.*\.h5ad.*\.zarr"):
        read_spatial(tmp_path / "counts.mtx")
    spaceranger = tmp_path / "outs"
    (spaceranger / "spatial").mkdir(parents=True)
    with pytest.raises(ValueError, match="Space Ranger"):
        read_spatial(spaceranger)
    (tmp_path / "broken.zarr").mkdir()
    with pytest.raises(ValueError, match="zarr"):
        read_spatial(tmp_path / "broken.zarr")


def test_read_spatial_spaceranger_folder_as_read_spaceranger(shared_path):
    """read_spatial reads a Space Ranger folder (.mtx matrix) into the AnnData read_spaceranger builds."""
    embryo = shared_path("mouse_embryo_cytassist")
    ref = read_spaceranger(embryo)
    adata, sdata = read_spatial(embryo)
    assert sdata is None
    assert adata.shape == ref.shape == (2898, 19465)
    assert list(adata.obs_names) == list(ref.obs_names)
    assert list(adata.var_names) == list(ref.var_names)
    assert (adata.X != ref.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["spatial"], ref.obsm["spatial"])
    pd.testing.assert_frame_equal(adata.obs, ref.obs)
    assert list(adata.uns["spatial"]) == list(ref.uns["spatial"]) == ["mouse_embryo_cytassist"]
    got, want = adata.uns["spatial"]["mouse_embryo_cytassist"], ref.uns["spatial"]["mouse_embryo_cytassist"]
    assert got["scalefactors"] == want["scalefactors"]
    assert got["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.2)
    np.testing.assert_array_equal(got["images"]["lowres"], want["images"]["lowres"])


def test_read_spatial_broken_spaceranger_folders(tmp_path):
    """A folder that looks like Space Ranger output but is not complete or readable: the message says what."""
    outs = tmp_path / "sample" / "outs"
    (outs / "spatial").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'.*sample'.*Space Ranger.*lacks a count matrix"):
        read_spatial(tmp_path / "sample")
    mtx = outs / "filtered_feature_bc_matrix"
    mtx.mkdir()
    (mtx / "matrix.mtx").write_text("not a matrix")
    with pytest.raises(ValueError, match=r"matrix\.mtx'.*not a readable Matrix Market"):
        read_spatial(outs)
    (mtx / "matrix.mtx").unlink()
    with pytest.raises(ValueError, match=r"filtered_feature_bc_matrix'.*no matrix\.mtx"):
        read_spatial(outs)


def test_spatial_format(tmp_path, shared_data):
    embryo = os.path.join(shared_data, "mouse_embryo_cytassist")
    adata = _results_adata()
    write_results(adata, tmp_path / "spots.h5ad")
    write_results(adata, tmp_path / "spots.zarr")
    del adata.obsm["spatial"]
    write_results(adata, tmp_path / "cells.h5ad")
    assert spatial_format(tmp_path / "spots.h5ad") == "h5ad"
    assert spatial_format(tmp_path / "spots.h5ad", require_spots=True) == "h5ad"
    assert spatial_format(tmp_path / "cells.h5ad") == "h5ad"  # read_spatial reads it...
    assert spatial_format(tmp_path / "cells.h5ad", require_spots=True) is None  # ...the napari reader leaves it
    assert spatial_format(tmp_path / "spots.zarr") == "zarr"
    assert spatial_format(tmp_path / "missing.h5ad") is None
    assert spatial_format(tmp_path) is None
    if os.path.isdir(embryo):
        assert spatial_format(embryo) == "spaceranger"


# --------------------------------------------------------------------------------------------
# read_spatial / write_results: SpatialData
# --------------------------------------------------------------------------------------------


def _spatialdata(adata: anndata.AnnData, tables: dict[str, str] | None = None):
    """A SpatialData with spot circles and ``adata`` as the table annotating them."""
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel

    xy = adata.obsm["spatial"]
    circles = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(adata.n_obs, 5.0)}, geometry=[Point(x, y) for x, y in xy])
    )
    table = adata.copy()
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["spot_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    names = tables or {"table": "table"}
    return sd.SpatialData(shapes={"spots": circles}, tables={name: table.copy() for name in names})


def test_spatialdata_round_trip(tmp_path):
    sdata = _spatialdata(_results_adata())
    src = tmp_path / "in.zarr"
    sdata.write(src)

    adata, sdata_in = read_spatial(src)
    assert sdata_in is not None
    assert adata is sdata_in.tables["table"]
    assert "spots" in sdata_in.shapes

    # results computed on a copy (as a fit would) replace the table in the written dataset
    results = _results_adata()
    results.obs = adata.obs.copy()
    out = write_results(results, tmp_path / "out" / "results.zarr", sdata=sdata_in)
    got, sdata_out = read_spatial(out)
    assert "spots" in sdata_out.shapes
    _assert_results_equal(got, results)
    assert got.uns["spatialdata_attrs"]["region"] == "spots"


def test_spatialdata_write_in_place(tmp_path):
    src = tmp_path / "data.zarr"
    _spatialdata(_results_adata()).write(src)
    adata, sdata = read_spatial(src)
    adata.uns["mod"]["date"] = datetime.date(2027, 1, 2)
    adata.obsm["q50_cell_abundance_w_sf"] = adata.obsm["q05_cell_abundance_w_sf"].rename(
        columns=lambda c: c.replace("q05", "q50")
    )

    write_results(adata, src, sdata=sdata)
    got, sdata_again = read_spatial(src)
    assert "spots" in sdata_again.shapes
    assert got.uns["mod"]["date"] == "2027-01-02"
    assert list(got.obsm["q50_cell_abundance_w_sf"].columns) == [f"q50cell_abundance_w_sf_{ct}" for ct in TYPES]


def test_spatialdata_table_choice(tmp_path):
    src = tmp_path / "two.zarr"
    _spatialdata(_results_adata(), tables={"counts": "", "other": ""}).write(src)
    with pytest.raises(ValueError, match=r"several tables.*table_key"):
        read_spatial(src)
    with pytest.raises(ValueError, match="'nope' is not a table"):
        read_spatial(src, table_key="nope")
    adata, sdata = read_spatial(src, table_key="other")
    assert adata is sdata.tables["other"]

    # a new table object must be told which table it replaces
    with pytest.raises(ValueError, match="table_key"):
        write_results(_results_adata(), tmp_path / "out.zarr", sdata=sdata)
    write_results(adata, tmp_path / "out.zarr", sdata=sdata)
    assert read_spatial(tmp_path / "out.zarr", table_key="other")[0].n_obs == adata.n_obs


def test_h5ad_output_from_spatialdata(tmp_path):
    src = tmp_path / "data.zarr"
    _spatialdata(_results_adata()).write(src)
    adata, sdata = read_spatial(src)
    out = write_results(adata, tmp_path / "table.h5ad", sdata=sdata)
    got, none = read_spatial(out)
    assert none is None
    _assert_results_equal(got, adata)


def test_single_cell_table_given_as_signatures_says_to_make_signatures(tmp_path):
    """A labelled single-cell .h5ad where signatures are expected: the message says what it is and where
    signatures come from."""
    from napari_cell2location.io import InputError

    rng = np.random.default_rng(0)
    cells = anndata.AnnData(rng.poisson(1, size=(30, 8)).astype(np.float32))
    cells.obs["cell_type"] = pd.Categorical(rng.choice(["B", "T"], 30))
    cells.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(InputError, match=r"single-cell table \(30 cells x 8 genes.*obs\['cell_type'\].*Reference tab"):
        read_signatures(tmp_path / "cells.h5ad")
