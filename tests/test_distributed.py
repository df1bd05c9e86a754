"""Data-parallel training (``torchrun``, gloo on CPU): the objective splits exactly over shards, and two
processes give the same answer as one."""

from __future__ import annotations

import os
import subprocess
import sys

import anndata
import numpy as np
import pytest
import torch

from napari_cell2location.datasets import synthetic_visium
from napari_cell2location.io import InputError
from napari_cell2location.model import DataParallel, FitSettings, build_model
from napari_cell2location.model._elbo import MeanFieldELBO
from napari_cell2location.model._parallel import _merge_uns

CPU = torch.device("cpu")


def test_single_process_layout():
    one = DataParallel()
    assert not one.active and one.is_main
    assert one.shard(7) == slice(0, 7)
    assert one.sum(1.5, 2) == (1.5, 2.0)
    assert one.gather("x") == ["x"]
    # shards of 3 processes cover every spot once, in order, sizes within one
    parts = [DataParallel(r, 3).shard(10) for r in range(3)]
    assert [p.start for p in parts] == [0, 3, 7] and [p.stop for p in parts] == [3, 7, 10]
    assert one.epoch_steps(1000, 300) == 4 and one.epoch_steps(1000, None) is None and one.epoch_steps(9, 20) is None
    with pytest.raises(InputError, match="cannot be shared by 4 processes"):
        DataParallel(0, 4).shard(3)


def test_from_env_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not DataParallel.from_env("cpu").active


def _unconstrained_draws(mod, rng):
    """A draw u of every site around the guide's loc (site name -> tensor)."""
    out = {}
    for name, loc in mod.guide.locs.named_parameters():
        site = name.removesuffix("_unconstrained")
        out[site] = (loc + 0.3 * torch.as_tensor(rng.standard_normal(tuple(loc.shape)), dtype=loc.dtype)).detach()
    return out


def test_the_loss_and_gradients_split_exactly_over_shards():
    """Two shards, each with the global terms weighted 1/2, sum to the whole section's loss and global
    gradients for the same draws; local gradients are the whole section's rows."""
    syn = synthetic_visium(n_spots=60, n_genes=80, n_cell_types=4, seed=0)
    settings = FitSettings(batch_key="batch")
    full = build_model(syn.adata.copy(), syn.signatures, settings)
    section = {"detection_mean": full.model_kwargs["detection_mean"], "genes": list(full.var_names)}
    section["batch_names"] = list(full.batch_names)
    parts = [slice(0, 25), slice(25, 60)]  # the first shard has spots of one batch only
    shards = [build_model(syn.adata[p].copy(), syn.signatures, settings, **section) for p in parts]
    assert [m.n_batch for m in shards] == [2, 2] and all(m.n_vars == full.n_vars for m in shards)
    for mod in (full, *shards):
        mod._ensure_guide(CPU)
    local = full._local_sites()
    assert {"w_sf", "detection_y_s"} <= local and "m_g" not in local
    rng = np.random.default_rng(1)
    with torch.no_grad():  # the shards start from the whole section's parameters
        for p in full.guide.parameters():
            p.add_(0.2 * torch.as_tensor(rng.standard_normal(tuple(p.shape)), dtype=p.dtype))
        whole = dict(full.guide.named_parameters())
        for mod, part in zip(shards, parts, strict=True):
            for name, p in mod.guide.named_parameters():
                site = name.split(".", 1)[-1].removesuffix("_unconstrained")
                p.copy_(whole[name][part] if site in local else whole[name])
    u = _unconstrained_draws(full, rng)

    loss = MeanFieldELBO(full.module, full.guide)(*full._full_args(CPU), unconstrained=u)
    loss.backward()
    total = 0.0
    for mod, part in zip(shards, parts, strict=True):
        u_part = {k: (v[part] if k in local else v) for k, v in u.items()}
        part_loss = MeanFieldELBO(mod.module, mod.guide, global_weight=0.5)(*mod._full_args(CPU), unconstrained=u_part)
        part_loss.backward()
        total = total + float(part_loss)
    assert total == pytest.approx(float(loss), rel=1e-5)

    grads = {name: p.grad for name, p in full.guide.named_parameters()}
    names = [n for n, _ in full.guide.named_parameters()]
    shard_grads = [dict(mod.guide.named_parameters()) for mod in shards]
    for name in names:
        site = name.split(".", 1)[-1].removesuffix("_unconstrained")
        if site in local:
            joined = torch.cat([g[name].grad for g in shard_grads])
        else:
            joined = sum(g[name].grad for g in shard_grads)
        np.testing.assert_allclose(
            joined.numpy(), grads[name].numpy(), rtol=2e-3, atol=1e-3 * float(grads[name].abs().max())
        )
    # the global parameters the processes replicate are exactly those of the non-local sites
    shared = {id(p) for p in full._global_parameters()}
    assert shared == {id(whole[n]) for n in names if n.split(".", 1)[-1].removesuffix("_unconstrained") not in local}


def test_merge_uns_joins_per_spot_arrays_in_rank_order():
    a = {
        "obs_names": np.array(["s0", "s1"]),
        "post_sample_means": {"w_sf": np.ones((2, 3)), "m_g": np.full((1, 4), 2.0)},
    }
    b = {"obs_names": np.array(["s2"]), "post_sample_means": {"w_sf": np.zeros((1, 3)), "m_g": np.full((1, 4), 2.0)}}
    out = _merge_uns([a, b], {"w_sf"})
    assert list(out["obs_names"]) == ["s0", "s1", "s2"]
    assert out["post_sample_means"]["w_sf"].shape == (3, 3) and out["post_sample_means"]["m_g"].shape == (1, 4)


def _pearson(path, truth) -> float:
    est = anndata.read_h5ad(path).obsm["means_cell_abundance_w_sf"].to_numpy()
    return float(np.corrcoef(est.ravel(), truth.ravel())[0, 1])


@pytest.mark.slow
def test_two_gloo_processes_give_the_answer_of_one(tmp_path):
    """``torchrun --nproc-per-node 2 -m napari_cell2location fit`` (gloo) against one process, same seed
    and total batch: Pearson to the truth within 0.01, every spot in the results in its place."""
    syn = synthetic_visium(n_spots=300, n_genes=400, n_cell_types=8, seed=3)
    syn.adata.write_h5ad(tmp_path / "section.h5ad")
    syn.signatures.to_csv(tmp_path / "signatures.csv")
    args = ["section.h5ad", "--signatures", "signatures.csv", "--batch-key", "batch", "--quiet"]
    args += ["--batch-size", "100", "--max-epochs", "300", "--lr", "0.01", "--seed", "0"]
    one = subprocess.run(
        [sys.executable, "-m", "napari_cell2location", "fit", *args, "--out", "one.h5ad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run(
        [*launcher, "-m", "napari_cell2location", "fit", *args, "--out", "two.h5ad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    truth = np.asarray(syn.truth["cell_abundance"])
    r_one, r_two = _pearson(tmp_path / "one.h5ad", truth), _pearson(tmp_path / "two.h5ad", truth)
    assert r_one > 0.85 and abs(r_two - r_one) <= 0.01, (r_one, r_two)
    res = anndata.read_h5ad(tmp_path / "two.h5ad")
    assert list(res.obs_names) == list(syn.adata.obs_names)
    assert list(res.obsm["cell2location_qc"].index) == list(syn.adata.obs_names)
    means = res.uns["mod"]["post_sample_means"]
    assert (
        means["w_sf"].shape == (300, 8) and means["detection_y_s"].shape == (300, 1) and means["m_g"].shape == (1, 400)
    )
    assert list(res.uns["mod"]["obs_names"]) == list(syn.adata.obs_names)


# --------------------------------------------------------------------------- checkpoints of a data-parallel fit
def test_parallel_checkpoint_record_is_checked(tmp_path):
    from napari_cell2location._infer._checkpoint_parallel import ParallelCheckpointer

    folder = tmp_path / "ck"
    folder.mkdir()
    record = folder / "checkpoint.parallel.json"
    record.write_text('{"format": "napari-cell2location checkpoint", "processes": 2, "epochs": 4}')
    with pytest.raises(InputError, match=r"over 2 processes; resume it with 2 \(torchrun --nproc-per-node 2\), not 3"):
        ParallelCheckpointer(folder, None, True, DataParallel(0, 3))
    with pytest.raises(InputError, match="already holds the checkpoint of a fit: resume it"):
        ParallelCheckpointer(folder, None, False, DataParallel(0, 2))
    with pytest.raises(
        InputError, match=r"checkpoint.rank1-of-2.e4.pt.*process 1's part of the checkpoint, is missing"
    ):
        ParallelCheckpointer(folder, None, True, DataParallel(1, 2))
    record.write_text("{not json")
    with pytest.raises(InputError, match="is not a readable checkpoint record"):
        ParallelCheckpointer(folder, None, True, DataParallel(0, 2))
    # a one-process fit is told what the folder holds, not started afresh over it
    from napari_cell2location._infer._checkpoint import Checkpointer

    with pytest.raises(InputError, match="holds the checkpoint of a data-parallel fit"):
        Checkpointer(folder, None, True)


def _fit_cli(cwd, *args, processes=1):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run(
        [*launcher, "-m", "napari_cell2location", "fit", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_a_killed_data_parallel_fit_resumes_to_the_same_answer(tmp_path):
    """Two gloo processes: 6 epochs with checkpoints, then --resume to 10, equal the straight 10 epochs;
    one process refuses the folder."""
    syn = synthetic_visium(n_spots=120, n_genes=200, n_cell_types=5, seed=4)
    syn.adata.write_h5ad(tmp_path / "section.h5ad")
    syn.signatures.to_csv(tmp_path / "signatures.csv")
    args = ["section.h5ad", "--signatures", "signatures.csv", "--batch-key", "batch", "--quiet", "--batch-size", "40"]
    ck = ["--checkpoint-dir", "ck", "--checkpoint-every", "2"]
    for run in (
        [*args, "--max-epochs", "10", "--out", "straight.h5ad"],
        [*args, *ck, "--max-epochs", "6", "--out", "first.h5ad"],
        [*args, *ck, "--max-epochs", "10", "--resume", "--out", "resumed.h5ad"],
    ):
        done = _fit_cli(tmp_path, *run, processes=2)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "checkpoint.parallel.json",
        "checkpoint.rank0-of-2.e10.pt",
        "checkpoint.rank1-of-2.e10.pt",
    ]
    key = "means_cell_abundance_w_sf"
    straight = anndata.read_h5ad(tmp_path / "straight.h5ad").obsm[key].to_numpy()
    first = anndata.read_h5ad(tmp_path / "first.h5ad").obsm[key].to_numpy()
    resumed = anndata.read_h5ad(tmp_path / "resumed.h5ad").obsm[key].to_numpy()
    assert np.abs(straight - first).max() > 1e-3  # 6 epochs are not 10
    np.testing.assert_array_equal(resumed, straight)
    one = _fit_cli(tmp_path, *args, *ck, "--max-epochs", "12", "--resume", "--out", "one.h5ad")
    assert one.returncode == 2 and "holds the checkpoint of a data-parallel fit" in one.stderr
    assert len(one.stderr.strip().splitlines()) == 1


def test_the_answer_does_not_depend_on_the_process(tmp_path):
    """Same seed, two interpreters with different string hashing: the same posterior samples (the
    draws of the observation-plate sites were once ordered by a set of their names)."""
    syn = synthetic_visium(n_spots=40, n_genes=60, n_cell_types=3, seed=2)
    syn.adata.write_h5ad(tmp_path / "section.h5ad")
    syn.signatures.to_csv(tmp_path / "signatures.csv")
    script = (
        "import anndata, pandas as pd, numpy as np\n"
        "from napari_cell2location.model import FitSettings, build_model\n"
        "a = anndata.read_h5ad('section.h5ad'); sig = pd.read_csv('signatures.csv', index_col=0)\n"
        "mod = build_model(a, sig, FitSettings(batch_key='batch'))\n"
        "mod.train(max_epochs=3, seed=0, device='cpu', progress_bar=False)\n"
        "s = mod.sample_posterior(num_samples=20, summaries=['means'])\n"
        "np.save('out.npy', np.concatenate([np.ravel(v) for _, v in sorted(s['post_sample_means'].items())]))\n"
    )
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(np.load(tmp_path / "out.npy"))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_shards_get_the_whole_sections_genes_batches_and_detection_mean():
    """What every shard's model is built with (genes with counts anywhere, every batch, detection_mean)
    equals what one process computes on the whole section, also when a gene has counts in one shard only
    and the spots have their own N."""
    from napari_cell2location.model._parallel import section_inputs, shard_summary

    syn = synthetic_visium(n_spots=60, n_genes=80, n_cell_types=4, seed=0)
    adata = syn.adata.copy()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    x[:30, 5] = 0  # gene 5: counts in the second shard only
    x[30:, 7] = 0  # gene 7: in the first only
    x[:, 9] = 0  # gene 9: nowhere (dropped by both)
    adata.X = x
    n_cells = np.random.default_rng(0).uniform(3, 12, adata.n_obs)
    parts = [slice(0, 30), slice(30, 60)]
    for n in (6.0, n_cells):
        settings = FitSettings(batch_key="batch", n_cells_per_location=n)
        full = build_model(adata.copy(), syn.signatures, settings)
        shard_settings = [
            FitSettings(batch_key="batch", n_cells_per_location=n if np.ndim(n) == 0 else n[p]) for p in parts
        ]
        shards = [build_model(adata[p].copy(), syn.signatures, s) for p, s in zip(parts, shard_settings, strict=True)]
        assert [m.n_vars for m in shards] == [full.n_vars - 1, full.n_vars - 1]  # each misses one gene
        got = section_inputs([shard_summary(m) for m in shards], adata.var_names, syn.signatures)
        assert got["genes"] == list(full.var_names) and got["batch_names"] == list(full.batch_names)
        assert got["detection_mean"] == pytest.approx(full.model_kwargs["detection_mean"], rel=1e-6)
