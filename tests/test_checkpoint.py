"""Checkpointed, resumable training: a fit killed after K epochs and resumed on a fresh model ends where the
uninterrupted fit ends (parameters and history), for both models, full data, minibatches and the fast mode;
damaged or foreign checkpoints are one clear InputError; the CLI and the Fit tab pass the options through."""

from __future__ import annotations

import logging

import anndata
import numpy as np
import pytest
import torch

from napari_cell2location import Cell2location
from napari_cell2location._infer._checkpoint import FILE_NAME, Checkpointer
from napari_cell2location.io import InputError
from napari_cell2location.model import AnswerStopper
from napari_cell2location.reference import RegressionModel

pytestmark = pytest.mark.filterwarnings("ignore:only .* genes are used")


def _params(mod) -> dict:
    return {k: v.detach().clone() for k, v in mod.guide.state_dict().items()}


def _assert_same_fit(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pa[k].numpy(), pb[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(a._history, b._history, rtol=1e-9)
    assert len(a._history) == len(b._history)
    assert a.history_["stop_reason"] == b.history_["stop_reason"]


def _train(make, kill_after=None, throw=False, **kwargs):
    """A fresh model trained with ``kwargs``; ``kill_after`` steps: closed (or an error thrown in) there."""
    mod = make()
    gen = mod.iter_train(device="cpu", seed=0, **kwargs)
    for i, _ in enumerate(gen):
        if kill_after is not None and i + 1 == kill_after:
            if throw:
                with pytest.raises(RuntimeError, match="killed"):
                    gen.throw(RuntimeError("killed"))
            else:
                gen.close()
            break
    return mod


@pytest.fixture
def spatial(make_tiny):
    adata, sig, _ = make_tiny(n_obs=60, n_vars=50, n_factors=4)

    def make(**kwargs):
        return Cell2location(adata, sig, **kwargs)

    make.adata, make.sig = adata, sig
    return make


@pytest.mark.parametrize(
    ("settings", "kill_after", "resumed_at"),
    [
        ({"max_epochs": 20, "checkpoint_every": 5}, 8, 8),  # full data: closed after a whole epoch, saved there
        ({"max_epochs": 10, "batch_size": 25, "checkpoint_every": 2}, 3 * 5 + 2, 4),  # mid-epoch 6: from 4
    ],
    ids=["full-data", "minibatch"],
)
def test_resume_ends_where_the_uninterrupted_fit_ends(spatial, tmp_path, caplog, settings, kill_after, resumed_at):
    whole = _train(spatial, **settings)
    killed = _train(spatial, kill_after=kill_after, checkpoint_dir=tmp_path, **settings)
    assert (tmp_path / FILE_NAME).is_file() and [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
    assert len(killed._history) < len(whole._history)
    with caplog.at_level(logging.INFO, logger="napari_cell2location"):
        resumed = _train(spatial, checkpoint_dir=tmp_path, resume=True, **settings)
    assert f"at epoch {resumed_at}" in caplog.text
    _assert_same_fit(whole, resumed)
    # the checkpoint now holds the end: resuming again trains nothing and changes nothing
    again = spatial()
    assert list(again.iter_train(device="cpu", seed=0, checkpoint_dir=tmp_path, resume=True, **settings)) == []
    _assert_same_fit(whole, again)


@pytest.mark.parametrize("batch_size", [None, 30], ids=["full-data", "minibatch"])
def test_resume_in_the_fast_mode_stops_where_the_uninterrupted_fit_stops(spatial, tmp_path, batch_size):
    def stopper():
        return AnswerStopper(tolerance=0.5, window=4, patience=2, min_epochs=8)

    settings = {"max_epochs": None, "batch_size": batch_size}
    whole = _train(spatial, early_stopping=stopper(), **settings)
    assert whole.history_["stop_reason"].startswith("the abundances converged")
    steps = 1 if batch_size is None else 2
    killed = _train(
        spatial,
        kill_after=7 * steps,
        throw=True,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
        early_stopping=stopper(),
        **settings,
    )
    assert len(killed._history) == 7  # a crash after a whole epoch is saved there too
    resumed = _train(spatial, checkpoint_dir=tmp_path, resume=True, early_stopping=stopper(), **settings)
    _assert_same_fit(whole, resumed)
    assert len(whole._history) > 7
    # it had stopped: a resumed fit stays stopped
    done = spatial()
    assert (
        list(done.iter_train(device="cpu", checkpoint_dir=tmp_path, resume=True, early_stopping=stopper(), **settings))
        == []
    )
    assert done.history_["stop_reason"] == whole.history_["stop_reason"]


def test_reference_regression_resumes_through_train(small_reference, tmp_path):
    RegressionModel.setup_anndata(small_reference, labels_key="ct", batch_key="batch")

    def make():
        return RegressionModel(small_reference)

    settings = {"max_epochs": 9, "batch_size": 40}  # 3 steps per epoch
    whole = _train(make, **settings)
    killed = _train(make, kill_after=3 * 5 + 1, checkpoint_dir=tmp_path, checkpoint_every=2, **settings)
    assert len(killed._history) == 6  # 5 whole epochs and a part: the checkpoint holds 4
    resumed = make().train(**settings, device="cpu", seed=0, progress_bar=False, checkpoint_dir=tmp_path, resume=True)
    _assert_same_fit(whole, resumed)


def test_resume_without_a_checkpoint_starts_fresh(spatial, tmp_path, caplog):
    folder = tmp_path / "new" / "ckpt"
    with caplog.at_level(logging.INFO, logger="napari_cell2location"):
        mod = _train(spatial, max_epochs=3, checkpoint_dir=folder, resume=True)
    assert "no checkpoint in" in caplog.text and "starting a fresh fit" in caplog.text
    assert len(mod._history) == 3 and (folder / FILE_NAME).is_file()
    _assert_same_fit(_train(spatial, max_epochs=3), mod)


def test_an_existing_checkpoint_is_not_overwritten_without_resume(spatial, tmp_path):
    _train(spatial, max_epochs=2, checkpoint_dir=tmp_path)
    before = (tmp_path / FILE_NAME).read_bytes()
    with pytest.raises(InputError, match="already holds the checkpoint of a fit.*resume.*delete it or choose another"):
        _train(spatial, max_epochs=2, checkpoint_dir=tmp_path)
    assert (tmp_path / FILE_NAME).read_bytes() == before
    with pytest.raises(InputError, match="resume needs the checkpoint's folder"):
        _train(spatial, max_epochs=2, resume=True)
    with pytest.raises(InputError, match="checkpoint_every must be a positive"):
        _train(spatial, max_epochs=2, checkpoint_dir=tmp_path / "other", checkpoint_every=0)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        _train(spatial, max_epochs=2, checkpoint_dir=tmp_path / "a_file")


def test_checkpoints_are_written_every_k_epochs_and_atomically(spatial, tmp_path, monkeypatch, caplog):
    import napari_cell2location._infer._checkpoint as ck

    written = []
    real_write = ck.Checkpointer.write

    def spy(self, optim):
        real_write(self, optim)
        written.append(len(self.est._history))

    monkeypatch.setattr(ck.Checkpointer, "write", spy)
    _train(spatial, max_epochs=11, checkpoint_dir=tmp_path / "a", checkpoint_every=4)
    assert written == [4, 8, 11]  # every 4 epochs and at the end
    written.clear()
    _train(spatial, max_epochs=250, checkpoint_dir=tmp_path / "b")
    assert written == [100, 200, 250]  # default: about every 100 steps
    written.clear()
    _train(spatial, max_epochs=10, batch_size=25, checkpoint_dir=tmp_path / "c")
    assert written == [10]  # 3 steps per epoch: every 34 epochs, and at the end
    monkeypatch.setattr(ck.Checkpointer, "write", real_write)

    # a write that dies half way leaves the last checkpoint whole and no partial file; training goes on
    mod = _train(spatial, max_epochs=4, checkpoint_dir=tmp_path / "d", checkpoint_every=2, kill_after=2)
    before = (tmp_path / "d" / FILE_NAME).read_bytes()
    real_save = torch.save

    def broken_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with caplog.at_level(logging.WARNING, logger="napari_cell2location"):
        mod = _train(spatial, max_epochs=4, checkpoint_dir=tmp_path / "d", checkpoint_every=2, resume=True)
    assert len(mod._history) == 4 and "could not write the checkpoint" in caplog.text
    assert (tmp_path / "d" / FILE_NAME).read_bytes() == before
    assert [p.name for p in (tmp_path / "d").iterdir()] == [FILE_NAME]
    monkeypatch.setattr(ck.torch, "save", real_save)
    # a partial file left by a killed process is cleared at the next start
    stale = tmp_path / "d" / ".checkpoint.partial-1234abcd.pt"
    stale.write_bytes(b"x")
    Checkpointer(tmp_path / "d", resume=True)
    assert not stale.exists()


def test_damaged_checkpoints_are_one_clear_error(spatial, tmp_path):
    good = tmp_path / "good"
    _train(spatial, max_epochs=3, checkpoint_dir=good)
    data = (good / FILE_NAME).read_bytes()
    cases = {
        "garbage": b"\x00\x17garbage bytes, not a checkpoint" * 10,
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    for name, content in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / FILE_NAME).write_bytes(content)
        with pytest.raises(InputError) as err:
            _train(spatial, max_epochs=5, checkpoint_dir=folder, resume=True)
        message = str(err.value)
        assert str(folder / FILE_NAME) in message and "is not a readable checkpoint" in message, message
        assert "delete it or choose another checkpoint folder" in message and "\n" not in message
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"weights": torch.ones(3)}, other / FILE_NAME)  # a torch file, not ours
    with pytest.raises(InputError, match="is not a napari-cell2location checkpoint; delete it"):
        _train(spatial, max_epochs=5, checkpoint_dir=other, resume=True)


def test_foreign_checkpoints_are_refused_naming_what_differs(spatial, make_tiny, small_reference, tmp_path):
    folder = tmp_path / "c2l"
    _train(spatial, max_epochs=3, checkpoint_dir=folder)
    adata, sig = spatial.adata, spatial.sig

    def refused(mod, match, **kwargs):
        with pytest.raises(InputError, match=match) as err:
            list(mod.iter_train(device="cpu", checkpoint_dir=folder, resume=True, **{"max_epochs": 5, **kwargs}))
        assert "is the checkpoint of another fit" in str(err.value) and "delete it or choose another" in str(err.value)
        assert str(folder / FILE_NAME) in str(err.value)

    refused(Cell2location(adata[:, :40].copy(), sig), r"other genes \(50 there, 40 here\)")
    refused(Cell2location(adata[:50].copy(), sig), r"other spots \(60 there, 50 here\)")
    refused(Cell2location(adata, sig.iloc[:, :3]), r"other cell types \(4 there, 3 here\)")
    renamed = adata.copy()
    renamed.var_names = [f"other_{g}" for g in renamed.var_names]
    refused(
        Cell2location(renamed, sig.set_axis(renamed.var_names, axis=0)), "other genes \\(as many, with other names\\)"
    )
    refused(spatial(), r"batch size all at once there, 20 here", batch_size=20)
    refused(spatial(), r"learning rate 0.002 there, 0.01 here", lr=0.01)
    refused(spatial(), "trained with the original's single-draw ELBO there, the fast mode's ELBO", max_epochs=None)
    refused(spatial(model_class="no-mg"), "model LocationModel.* there, .* here")
    refused(spatial(detection_alpha=200.0), r"other model settings or priors")
    RegressionModel.setup_anndata(small_reference, labels_key="ct")
    refused(RegressionModel(small_reference), r"it is a Cell2location's, this is a RegressionModel", batch_size=None)


def test_checkpoint_size_and_cost(spatial, tmp_path):
    mod = spatial()
    ck = None
    gen = mod.iter_train(device="cpu", max_epochs=6, checkpoint_dir=tmp_path, checkpoint_every=1)
    list(gen)
    ck = Checkpointer(tmp_path, resume=True)
    n_params = sum(p.numel() for p in mod.guide.parameters())
    size = (tmp_path / FILE_NAME).stat().st_size
    assert 3 * 4 * n_params < size < 3 * 4 * n_params + 200_000  # parameters, two moments, and small change
    assert ck.saved["epochs"] == 6


# ---------------------------------------------------------------------------------------------- command line
def _cli_fit(spatial_path, sig_path, out, *extra):
    from napari_cell2location._cli import main

    args = ["fit", str(spatial_path), "--signatures", str(sig_path), "--out", str(out), "--device", "cpu"]
    args += ["--use-quantiles", "--quiet", "--batch-size", "20", "--n-cells-per-location", "4", *map(str, extra)]
    return main(args)


@pytest.fixture
def cli_files(tmp_path, make_tiny):
    adata, sig, _ = make_tiny(n_obs=40, n_vars=50, n_factors=3)
    spatial = tmp_path / "spatial.h5ad"
    adata.write_h5ad(spatial)
    sig.to_csv(tmp_path / "sig.csv")
    return spatial, tmp_path / "sig.csv"


def test_cli_fit_killed_then_resumed_equals_uninterrupted(cli_files, tmp_path, capsys):
    spatial, sig = cli_files
    assert _cli_fit(spatial, sig, tmp_path / "whole.h5ad", "--max-epochs", 8) == 0
    ckpt = tmp_path / "ckpt"
    assert _cli_fit(spatial, sig, tmp_path / "part.h5ad", "--max-epochs", 3, "--checkpoint-dir", ckpt) == 0
    assert (ckpt / FILE_NAME).is_file()
    rc = _cli_fit(
        spatial,
        sig,
        tmp_path / "resumed.h5ad",
        "--max-epochs",
        8,
        "--checkpoint-dir",
        ckpt,
        "--checkpoint-every",
        2,
        "--resume",
    )
    assert rc == 0
    whole, resumed = anndata.read_h5ad(tmp_path / "whole.h5ad"), anndata.read_h5ad(tmp_path / "resumed.h5ad")
    for key in ("means_cell_abundance_w_sf", "q05_cell_abundance_w_sf"):
        np.testing.assert_allclose(resumed.obsm[key].to_numpy(), whole.obsm[key].to_numpy(), rtol=1e-5)
    part = anndata.read_h5ad(tmp_path / "part.h5ad")
    assert not np.allclose(
        part.obsm["means_cell_abundance_w_sf"].to_numpy(), whole.obsm["means_cell_abundance_w_sf"].to_numpy()
    )
    capsys.readouterr()


def test_cli_bad_checkpoints_exit_2_with_one_line(cli_files, tmp_path, capsys):
    spatial, sig = cli_files
    ckpt = tmp_path / "ckpt"
    assert _cli_fit(spatial, sig, tmp_path / "a.h5ad", "--max-epochs", 2, "--checkpoint-dir", ckpt) == 0
    capsys.readouterr()
    cases = [
        (["--checkpoint-dir", ckpt], "already holds the checkpoint"),  # no --resume: not overwritten
        (["--checkpoint-dir", ckpt, "--resume", "--batch-size", 10], "batch size 20 there, 10 here"),
        (["--resume"], "resume needs the checkpoint's folder"),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / FILE_NAME).write_bytes((ckpt / FILE_NAME).read_bytes()[:1000])
    cases.append((["--checkpoint-dir", bad, "--resume"], "is not a readable checkpoint"))
    for extra, expected in cases:
        assert _cli_fit(spatial, sig, tmp_path / "b.h5ad", "--max-epochs", 4, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and err.startswith("napari-cell2location fit: error:"), (
            err
        )
    assert not (tmp_path / "b.h5ad").exists()


# ---------------------------------------------------------------------------------------------- Fit tab
def test_fit_tab_writes_a_checkpoint_and_resumes_it(make_napari_viewer, qtbot, tmp_path):
    pytest.importorskip("pytestqt")
    from napari_cell2location._qt import Cell2locationDock
    from napari_cell2location._sample_data import synthetic_section_layers

    viewer = make_napari_viewer()
    for data, kwargs, kind in synthetic_section_layers(n_spots=60, n_genes=40, n_cell_types=4, seed=1):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    dock = Cell2locationDock(viewer)
    fit = dock.fit
    assert fit.checkpoint_dir() is None and not fit.resume.enabled and fit.settings().checkpoint_dir is None
    fit.checkpoint_path.value = tmp_path / "ckpt"
    assert fit.resume.enabled and fit.settings().checkpoint_dir == tmp_path / "ckpt"
    fit.epochs.value = 4
    fit.run()
    qtbot.waitUntil(lambda: fit.worker is None, timeout=120_000)
    assert fit.status.value.startswith("done"), fit.status.value
    first = list(fit.state.model.history_["elbo_train"]["elbo_train"])
    assert (tmp_path / "ckpt" / FILE_NAME).is_file() and len(first) == 4
    fit.epochs.value = 7
    fit.resume.value = True
    assert fit.settings().resume
    fit.run()
    qtbot.waitUntil(lambda: fit.worker is None, timeout=120_000)
    assert fit.status.value.startswith("done"), fit.status.value
    history = list(fit.state.model.history_["elbo_train"]["elbo_train"])
    assert len(history) == 7 and history[:4] == first and len(fit.losses) == 3  # 3 more steps
    assert "7 epochs" in fit.status.value
