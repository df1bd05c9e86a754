"""Command line: fit on files, demo --headless, one-line errors."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from napari_cell2location._cli import main


@pytest.fixture
def files(tmp_path, make_tiny):
    adata, sig, _ = make_tiny(n_obs=50, n_vars=60, n_factors=3)
    spatial = tmp_path / "spatial.h5ad"
    adata.write_h5ad(spatial)
    sig_path = tmp_path / "sig.csv"
    sig.to_csv(sig_path)
    return spatial, sig_path, sig


def test_fit_writes_h5ad(files, tmp_path, capsys):
    spatial, sig_path, sig = files
    out = tmp_path / "res" / "out.h5ad"
    rc = main(
        [
            "fit",
            str(spatial),
            "--signatures",
            str(sig_path),
            "--out",
            str(out),
            "--batch-key",
            "sample",
            "--max-epochs",
            "5",
            "--num-samples",
            "20",
            "--n-cells-per-location",
            "4",
            "--device",
            "cpu",
            "--save-model",
            str(tmp_path / "model"),
        ]
    )
    assert rc == 0
    res = anndata.read_h5ad(out)
    for k in ("means", "stds", "q05", "q50", "q95"):
        df = res.obsm[f"{k}_cell_abundance_w_sf"]
        assert list(df.columns) == [f"{k}cell_abundance_w_sf_{t}" for t in sig.columns]
    assert res.uns["mod"]["model_name"].startswith("LocationModel")
    assert (tmp_path / "model" / "attr.json").exists()
    assert "wrote" in capsys.readouterr().out


def test_fit_zarr_spatialdata_round_trip(tmp_path):
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=40, n_genes=60, n_cell_types=3, n_batches=1, image=False, seed=2)
    sdata = data.to_spatialdata()
    src = tmp_path / "in.zarr"
    sdata.write(src)
    sig_path = tmp_path / "sig.csv"
    data.signatures.to_csv(sig_path)
    out = tmp_path / "out.zarr"
    rc = main(
        [
            "fit",
            str(src),
            "--signatures",
            str(sig_path),
            "--out",
            str(out),
            "--max-epochs",
            "3",
            "--use-quantiles",
            "--quiet",
        ]
    )
    assert rc == 0
    import spatialdata

    back = spatialdata.read_zarr(out)
    table = back.tables["table"]
    assert table.obsm["q05_cell_abundance_w_sf"].shape == (40, 3)
    assert set(back.shapes) == set(sdata.shapes)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: setattr(a, "X", a.X.toarray() / 7.0), "non-integer"),
        (lambda a: a.obs.drop(columns="sample", inplace=True), "columns present"),
    ],
)
def test_fit_bad_input_exits_with_one_line(files, tmp_path, capsys, mutate, message):
    spatial, sig_path, _ = files
    adata = anndata.read_h5ad(spatial)
    mutate(adata)
    bad = tmp_path / "bad.h5ad"
    adata.write_h5ad(bad)
    rc = main(
        [
            "fit",
            str(bad),
            "--signatures",
            str(sig_path),
            "--out",
            str(tmp_path / "o.h5ad"),
            "--batch-key",
            "sample",
            "--max-epochs",
            "2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.h5ad").exists()


def test_fit_missing_files_and_bad_out(files, tmp_path, capsys):
    spatial, sig_path, _ = files
    assert (
        main(
            [
                "fit",
                str(tmp_path / "nope.h5ad"),
                "--signatures",
                str(sig_path),
                "--out",
                str(tmp_path / "o.h5ad"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit", str(spatial), "--signatures", str(sig_path), "--out", str(tmp_path / "o.txt"), "--quiet"]) == 2
    assert "--out must end" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", str(spatial), "--signatures", str(sig_path), "--out", "x.h5ad", "--max-epochs", "0"])


def test_demo_headless(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--headless",
            "--out",
            str(out),
            "--n-spots",
            "80",
            "--n-genes",
            "120",
            "--n-cell-types",
            "4",
            "--max-epochs",
            "20",
            "--num-samples",
            "30",
            "--quiet",
        ]
    )
    assert rc == 0
    for name in ("results.zarr", "abundance_map.png", "qc.png", "model/attr.json"):
        assert (out / name).exists(), name
    from PIL import Image

    img = np.asarray(Image.open(out / "abundance_map.png"))
    assert img.shape[0] > 200 and img.std() > 10  # a real figure, not a blank canvas
    assert "Pearson r" in capsys.readouterr().out


def test_fit_spaceranger_folder_writes_contract_keys(tmp_path, shared_path):
    """`fit` reads a Space Ranger folder (.mtx matrix) through io.read_spatial, as File > Open does."""
    embryo = shared_path("mouse_embryo_cytassist")
    import pandas as pd

    from napari_cell2location.io import read_spaceranger

    adata = read_spaceranger(embryo)
    totals = np.asarray(adata.X.sum(0)).ravel()
    genes = adata.var_names[np.sort(np.argsort(-totals)[:300])]  # 300 well-expressed genes, in data order
    # three "cell types": mean expression of the spots in three bands across the section
    band = pd.qcut(adata.obs["array_col"], 3, labels=False).to_numpy()
    x = adata[:, genes].X.toarray()
    types = ["left", "middle", "right"]
    sig = pd.DataFrame({t: x[band == i].mean(0) for i, t in enumerate(types)}, index=genes)
    sig_path = tmp_path / "sig.csv"
    sig.to_csv(sig_path)
    out = tmp_path / "res.h5ad"
    args = ["fit", embryo, "--signatures", str(sig_path), "--out", str(out)]
    assert main([*args, "--max-epochs", "20", "--quiet", "--device", "cpu"]) == 0

    res = anndata.read_h5ad(out)
    assert res.shape == adata.shape
    assert list(res.obs_names) == list(adata.obs_names)
    for k in ("means", "stds", "q05", "q50", "q95"):
        df = res.obsm[f"{k}_cell_abundance_w_sf"]
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == [f"{k}cell_abundance_w_sf_{t}" for t in types]
        assert list(df.index) == list(adata.obs_names)
        assert np.isfinite(df.to_numpy()).all() and (df.to_numpy() >= 0).all()
    mod = res.uns["mod"]
    assert [str(n) for n in mod["factor_names"]] == types
    assert [str(n) for n in mod["var_names"]] == list(genes)
    assert [str(n) for n in mod["obs_names"]] == list(adata.obs_names)
