"""The headless model: validation, training, posterior, export contract, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_cell2location import Cell2location
from napari_cell2location._infer._likelihood import CountsPattern, NegativeBinomialCounts
from napari_cell2location.io import InputError
from napari_cell2location.model import (
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel as MainModel,
)
from napari_cell2location.model import (
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel as NoMG,
)
from napari_cell2location.model import (
    LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel as NoFact,
)


def fitted(adata, sig, steps=30, **kwargs):
    Cell2location.setup_anndata(adata, batch_key="sample")
    mod = Cell2location(adata, sig, N_cells_per_location=5.0, **kwargs)
    mod.train(max_epochs=steps, lr=0.01, progress_bar=False, seed=0)
    return mod


# --------------------------------------------------------------------------- likelihood
def test_nb_likelihood_matches_torch():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.negative_binomial(3, 0.3, size=(7, 11)), dtype=torch.float32)
    x[0] = 0
    mu = torch.tensor(rng.gamma(2, 2, size=(7, 11)), dtype=torch.float32)
    alpha_e = torch.tensor(rng.gamma(5, 1, size=(2, 11)), dtype=torch.float32)
    batch = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    alpha = alpha_e[batch]
    ref = torch.distributions.NegativeBinomial(total_count=alpha, logits=torch.log(mu) - torch.log(alpha))
    expected = ref.log_prob(x).sum(-1, keepdim=True)
    for pattern in (None, CountsPattern(x)):
        got = NegativeBinomialCounts(mu, alpha_e, batch_index=batch, pattern=pattern).log_prob(x)
        assert got.shape == (7, 1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    one = NegativeBinomialCounts(mu, alpha_e[:1], batch_index=batch).log_prob(x)
    ref1 = torch.distributions.NegativeBinomial(total_count=alpha_e[:1], logits=torch.log(mu) - torch.log(alpha_e[:1]))
    torch.testing.assert_close(one, ref1.log_prob(x).sum(-1, keepdim=True), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- validation
def _expect(match, adata, sig, **kwargs):
    with pytest.raises(InputError, match=match):
        Cell2location(adata, sig, **kwargs)


def test_rejects_non_integer_counts(tiny):
    adata, sig, _ = tiny
    adata.X = adata.X.toarray() / 3.0
    _expect("non-integer", adata, sig)


def test_rejects_negative_counts(tiny):
    adata, sig, _ = tiny
    X = adata.X.toarray()
    X[3, 2] = -1
    adata.X = X
    _expect("negative", adata, sig)


def test_rejects_nan_counts(tiny):
    adata, sig, _ = tiny
    X = adata.X.toarray()
    X[5, 7] = np.nan
    adata.X = X
    _expect("NaN", adata, sig)


def test_rejects_duplicate_names(tiny):
    adata, sig, _ = tiny
    a = adata.copy()
    a.obs_names = ["same"] * a.n_obs
    _expect("duplicate spot names", a, sig)
    b = adata.copy()
    names = list(b.var_names)
    names[1] = names[0]
    b.var_names = names
    _expect("duplicate gene names", b, sig)
    s = sig.copy()
    s.index = [sig.index[0]] + list(sig.index[1:-1]) + [sig.index[0]]
    _expect("duplicate gene names", adata, s)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.assign(Type1=np.nan), "NaN"),
        (lambda s: s.assign(Type2=-s["Type2"]), "negative"),
        (lambda s: s.assign(Type0=0.0), "all-zero"),
    ],
)
def test_rejects_bad_signatures(tiny, mutate, match):
    adata, sig, _ = tiny
    _expect(match, adata, mutate(sig))


def test_unknown_batch_key_lists_columns(tiny):
    adata, sig, _ = tiny
    with pytest.raises(InputError, match=r"columns present: \['sample', 'other'\]"):
        Cell2location.setup_anndata(adata, batch_key="slide")
    adata.uns["napari_cell2location_setup"] = {"batch_key": "slide"}
    _expect("columns present", adata, sig)


def test_missing_layer(tiny):
    adata, sig, _ = tiny
    with pytest.raises(InputError, match="layers present"):
        Cell2location.setup_anndata(adata, layer="counts")


def test_too_few_shared_genes(tiny):
    adata, sig, _ = tiny
    s = sig.iloc[:10]
    _expect("only 10 genes are shared", adata, s)
    renamed = sig.rename(index=lambda g: "ENSG" + g)
    _expect("same gene identifiers", adata, renamed)


def test_genes_intersected_reordered_and_zero_genes_dropped(tiny):
    adata, sig, _ = tiny
    X = adata.X.toarray()
    X[:, 3] = 0  # gene_3 has no counts anywhere
    adata.X = X
    shuffled = sig.sample(frac=1.0, random_state=0)
    extra = pd.DataFrame(1.0, index=["not_in_data_1", "not_in_data_2"], columns=sig.columns)
    shuffled = pd.concat([shuffled, extra])
    mod = Cell2location(adata, shuffled)
    assert "gene_3" not in mod.var_names
    assert mod.input_report["n_genes_zero_dropped"] == 1
    assert mod.input_report["n_genes_shared"] == adata.n_vars
    assert list(mod.var_names) == [g for g in adata.var_names if g != "gene_3"]
    np.testing.assert_allclose(mod.cell_state_df.loc["gene_7"].to_numpy(), sig.loc["gene_7"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        mod.module.cell_state[:, list(mod.var_names).index("gene_7")].numpy(), sig.loc["gene_7"].to_numpy(), rtol=1e-6
    )


def test_user_adata_unchanged_except_outputs(tiny):
    adata, sig, _ = tiny
    before = adata.copy()
    mod = fitted(adata, sig, steps=3)
    mod.export_posterior(adata, sample_kwargs={"num_samples": 10})
    assert (adata.X != before.X).nnz == 0
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert adata.var.equals(before.var)
    assert set(adata.uns) == {"napari_cell2location_setup", "mod"}
    assert set(adata.obsm) == {f"{k}_cell_abundance_w_sf" for k in ("means", "stds", "q05", "q95")}


def test_detection_mean_uses_n_in_force(tiny):
    adata, sig, _ = tiny
    m4 = Cell2location(adata, sig, N_cells_per_location=4.0)
    m8 = Cell2location(adata, sig, N_cells_per_location=8.0)
    d4 = float(m4.module.detection_mean[0, 0])
    d8 = float(m8.module.detection_mean[0, 0])
    assert d4 == pytest.approx(2 * d8, rel=1e-5)
    X = adata.X.toarray()
    expected = (X.sum(1) / 4.0).mean() / sig.sum(0).mean()
    assert d4 == pytest.approx(expected, rel=1e-5)
    per = Cell2location(adata, sig, N_cells_per_location=4.0, detection_mean_per_sample=True)
    Cell2location.setup_anndata(adata, batch_key="sample")
    per = Cell2location(adata, sig, N_cells_per_location=4.0, detection_mean_per_sample=True)
    assert per.module.detection_mean.shape == (2, 1)
    assert per.module.detection_mean[0, 0] != per.module.detection_mean[1, 0]


def test_per_spot_n_cells_prior(tiny):
    adata, sig, _ = tiny
    n = np.linspace(2, 12, adata.n_obs)
    mod = Cell2location(adata, sig, N_cells_per_location=n)
    np.testing.assert_allclose(mod.module.N_cells_per_location.numpy().ravel(), n, rtol=1e-6)
    with pytest.raises(InputError, match="has 3 values"):
        Cell2location(adata, sig, N_cells_per_location=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="positive"):
        Cell2location(adata, sig, N_cells_per_location=np.zeros(adata.n_obs))


def test_device_choice(tiny):
    adata, sig, _ = tiny
    mod = Cell2location(adata, sig)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            mod.train(max_epochs=1, device="cuda", progress_bar=False)
    with pytest.raises(InputError, match="unsupported device"):
        mod.train(max_epochs=1, device="tpu", progress_bar=False)
    mod.train(max_epochs=1, device="auto", progress_bar=False)
    assert mod.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("model_class", [MainModel, NoFact, NoMG])
def test_all_variants_train(tiny, model_class):
    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=60, model_class=model_class)
    hist = mod.history_["elbo_train"]["elbo_train"].to_numpy()
    assert len(hist) == 60 and np.all(np.isfinite(hist))
    assert hist[-10:].mean() < hist[:10].mean()
    mod.export_posterior(adata, sample_kwargs={"num_samples": 20})
    w = adata.obsm["means_cell_abundance_w_sf"]
    assert w.shape == (adata.n_obs, sig.shape[1]) and np.all(w.to_numpy() > 0)
    assert adata.uns["mod"]["model_name"] == model_class.__name__


def test_iter_train_yields_and_can_stop(tiny):
    adata, sig, _ = tiny
    mod = Cell2location(adata, sig)
    gen = mod.iter_train(max_epochs=10, batch_size=25, lr=0.01)  # 3 steps per epoch
    recs = [next(gen) for _ in range(7)]
    assert [r.step for r in recs] == list(range(1, 8))
    assert all(r.total == 30 for r in recs)
    assert [r.epoch for r in recs] == [0, 0, 0, 1, 1, 1, 2]
    gen.close()  # what a GUI's cancel does
    assert len(mod.history_["elbo_train"]) == 3  # 2 full epochs + the interrupted one
    assert mod.is_trained_
    assert mod.guide.locs.w_sf.shape == (adata.n_obs, sig.shape[1])  # full size with minibatches
    mod.train(max_epochs=2, progress_bar=False)  # training continues from where it stopped
    assert len(mod.history_["elbo_train"]) == 5


def test_bad_training_arguments(tiny):
    adata, sig, _ = tiny
    mod = Cell2location(adata, sig)
    with pytest.raises(InputError, match="train_size"):
        mod.train(max_epochs=1, train_size=0.9)
    with pytest.raises(TypeError, match="use_gpu"):
        mod.train(max_epochs=1, use_gpu=True)
    with pytest.raises(InputError, match="unknown model arguments"):
        Cell2location(adata, sig, N_cells=3)


def test_two_fits_in_one_process_do_not_interfere(tiny, make_tiny):
    import pyro

    adata, sig, _ = tiny
    a = fitted(adata, sig, steps=5)
    state_a = {k: v.clone() for k, v in a.guide.state_dict().items()}
    adata2, sig2, _ = make_tiny(n_obs=40, n_vars=60, n_factors=3, seed=3)
    b = fitted(adata2, sig2, steps=5)
    for k, v in a.guide.state_dict().items():
        torch.testing.assert_close(v, state_a[k], rtol=0, atol=0)
    assert b.guide.locs.w_sf.shape == (40, 3)
    assert len(pyro.get_param_store()) == 0
    a.train(max_epochs=2, progress_bar=False)  # a still trains, with its own shapes
    assert a.guide.locs.w_sf.shape == (60, 4)


# --------------------------------------------------------------------------- posterior
def test_quantiles_from_guide_agree_with_samples(tiny):
    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=50)
    torch.manual_seed(0)
    sampled = mod.sample_posterior(num_samples=4000, summaries=("means", "stds", "q05", "q50", "q95"))
    exact = mod._summaries_from_guide(["means", "stds", "q05", "q50", "q95"])
    for k in ("means", "stds", "q05", "q50", "q95"):
        for site in ("w_sf", "m_g", "detection_y_s", "alpha_g_inverse"):
            a = sampled[f"post_sample_{k}"][site]
            b = exact[f"post_sample_{k}"][site]
            assert a.shape == b.shape
            rel = np.abs(a - b) / (np.abs(b) + 1e-3)
            assert np.median(rel) < 0.03, (k, site, np.median(rel))
    q = mod.posterior_quantile(0.05)
    np.testing.assert_allclose(q["w_sf"], exact["post_sample_q05"]["w_sf"], rtol=1e-5)
    batched = mod.posterior_quantile(0.05, batch_size=7)
    np.testing.assert_allclose(batched["w_sf"], q["w_sf"], rtol=1e-6)
    u = sampled["post_sample_means"]["u_sf_mRNA_factors"]
    assert u.shape == (adata.n_obs, sig.shape[1])


def test_export_contract(tiny, tmp_path, make_tiny):
    import anndata

    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=10)
    mod.export_posterior(adata, sample_kwargs={"num_samples": 50, "batch_size": 16})
    types = list(sig.columns)
    for k in ("means", "stds", "q05", "q95"):
        df = adata.obsm[f"{k}_cell_abundance_w_sf"]
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == [f"{k}cell_abundance_w_sf_{t}" for t in types]
        assert list(df.index) == list(adata.obs_names)
    mod_uns = adata.uns["mod"]
    for key in ("factor_names", "var_names", "obs_names", "model_name", "date"):
        assert key in mod_uns
    for k in ("means", "stds", "q05", "q95"):
        assert mod_uns[f"post_sample_{k}"]["w_sf"].shape == (adata.n_obs, len(types))
    assert list(mod_uns["factor_names"]) == types
    q05 = adata.obsm["q05_cell_abundance_w_sf"].to_numpy()
    q95 = adata.obsm["q95_cell_abundance_w_sf"].to_numpy()
    assert np.all(q05 <= q95)
    path = tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    np.testing.assert_allclose(back.obsm["q05_cell_abundance_w_sf"].to_numpy(), q05)
    assert list(back.uns["mod"]["factor_names"]) == types

    mod.export_posterior(adata, use_quantiles=True, add_to_obsm=["means", "stds", "q05", "q50", "q95"])
    assert "q50_cell_abundance_w_sf" in adata.obsm
    assert list(adata.obsm["q50_cell_abundance_w_sf"].columns)[0] == f"q50cell_abundance_w_sf_{types[0]}"
    with pytest.raises(InputError, match="unknown summary"):
        mod.export_posterior(adata, add_to_obsm=["median"], use_quantiles=True)
    other, _, _ = make_tiny(n_obs=30)
    with pytest.raises(InputError, match="spots"):
        mod.export_posterior(other, use_quantiles=True)


def test_save_load_round_trip(tiny, tmp_path):
    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=20)
    q = mod.posterior_quantile(0.05)
    mod.save(tmp_path / "model")
    with pytest.raises(FileExistsError):
        mod.save(tmp_path / "model")
    from napari_cell2location.model._cell2location import SETUP_KEY

    setup_before = dict(adata.uns[SETUP_KEY])
    loaded = Cell2location.load(tmp_path / "model", adata)
    assert dict(adata.uns[SETUP_KEY]) == setup_before  # the user's set-up is left as it was
    bare = adata.copy()
    del bare.uns[SETUP_KEY]
    Cell2location.load(tmp_path / "model", bare)
    assert SETUP_KEY not in bare.uns
    for k, v in mod.guide.state_dict().items():  # no training step ran on load
        torch.testing.assert_close(loaded.guide.state_dict()[k], v, rtol=0, atol=0)
    q2 = loaded.posterior_quantile(0.05)
    for site in q:
        np.testing.assert_array_equal(q[site], q2[site])
    assert loaded.history_["elbo_train"]["elbo_train"].tolist() == mod.history_["elbo_train"]["elbo_train"].tolist()
    assert loaded.is_trained_
    torch.testing.assert_close(loaded.module.detection_mean, mod.module.detection_mean)
    loaded.export_posterior(adata, use_quantiles=True)
    with pytest.raises(FileNotFoundError):
        Cell2location.load(tmp_path / "nothing", adata)


def test_expected_counts_and_qc_plot(tiny):
    import matplotlib

    matplotlib.use("Agg")
    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=30)
    mod.export_posterior(adata, sample_kwargs={"num_samples": 30})
    exp = mod.compute_expected()
    assert exp["mu"].shape == (adata.n_obs, mod.n_vars)
    X = adata.X.toarray()
    assert np.corrcoef(np.log1p(exp["mu"]).ravel(), np.log1p(X).ravel())[0, 1] > 0.5
    per_type = mod.compute_expected_per_cell_type()
    assert len(per_type["mu"]) == sig.shape[1]
    total = sum(m.toarray() for m in per_type["mu"])
    assert np.all(total <= X + 1e-3)  # the cell types share the observed counts (background takes the rest)
    fig = mod.plot_QC()
    assert len(fig.axes) >= 2
    ax = mod.plot_history()
    n_epochs = len(mod.history_["elbo_train"])
    assert len(ax.lines) == (2 if n_epochs >= 20 else 1)
    assert len(ax.lines[0].get_xdata()) == n_epochs


def test_grouped_lgamma_gives_the_same_total_and_gradients():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.negative_binomial(2, 0.4, size=(9, 13)), dtype=torch.float32)
    batch = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    mu = torch.tensor(rng.gamma(2, 2, size=(9, 13)), dtype=torch.float32, requires_grad=True)
    alpha = torch.tensor(rng.gamma(5, 1, size=(3, 13)), dtype=torch.float32, requires_grad=True)
    onehot = torch.nn.functional.one_hot(batch, 3).float()
    totals, grads = [], []
    for pattern, o2b in ((CountsPattern(x, batch), None), (CountsPattern(x, batch, grouped=True), onehot)):
        lp = NegativeBinomialCounts(mu, alpha, batch_index=batch, pattern=pattern, obs2batch=o2b).log_prob(x)
        assert lp.shape == (9, 1)
        total = lp.sum()
        g = torch.autograd.grad(total, (mu, alpha))
        totals.append(total.detach())
        grads.append(g)
    ref = torch.distributions.NegativeBinomial(alpha[batch], logits=torch.log(mu) - torch.log(alpha[batch]))
    torch.testing.assert_close(totals[0], ref.log_prob(x).sum().detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(totals[1], totals[0], rtol=1e-5, atol=1e-3)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fast_mode_starts_from_the_prior_and_stops_on_the_answer(tiny):
    from napari_cell2location.model._cell2location import AUTO_MAX_EPOCHS, ConvergenceStopper

    adata, sig, w = tiny
    mod = Cell2location(adata, sig, N_cells_per_location=float(w.sum(1).mean()))
    gen = mod.iter_train(max_epochs=None, seed=0)
    first = next(gen)
    assert first.total == AUTO_MAX_EPOCHS and first.loss > 0
    gen.close()
    assert mod.guide.prototype_trace is not None
    assert "w_sf" not in mod._init_values  # the original's start: every w_sf at its prior mean
    mod = Cell2location(adata, sig, N_cells_per_location=float(w.sum(1).mean()))
    mod.train(max_epochs=None, seed=0, progress_bar=False)
    epochs = len(mod.history_["elbo_train"])
    assert 300 <= epochs < AUTO_MAX_EPOCHS  # stopped on the answer, not at the cap
    assert (
        mod.history_["stop_reason"].startswith("the abundances converged")
        and f"{epochs} epochs" in mod.history_["stop_reason"]
    )
    # a loss-based stopper still works when given
    mod = Cell2location(adata, sig, N_cells_per_location=float(w.sum(1).mean()))
    stopper = ConvergenceStopper(window=50, rtol=5e-3, patience=1, min_epochs=100)
    recs = list(mod.iter_train(max_epochs=None, seed=0, early_stopping=stopper))
    assert 100 <= len(recs) < AUTO_MAX_EPOCHS and mod.history_["stop_reason"].startswith("the loss converged")
    # the regression start on request
    mod = Cell2location(adata, sig, N_cells_per_location=float(w.sum(1).mean()))
    mod.train(max_epochs=5, init="nnls", seed=0, progress_bar=False)
    start = mod._init_values["w_sf"]
    assert start.shape == w.shape and np.corrcoef(start.ravel(), w.ravel())[0, 1] > 0.8
    # an explicit max_epochs runs exactly that many epochs from the prior (the original's behaviour)
    other = Cell2location(adata, sig)
    other.train(max_epochs=7, progress_bar=False)
    assert len(other.history_["elbo_train"]) == 7 and "w_sf" not in other._init_values
    assert other.history_["stop_reason"] == "7 epochs done"
    with pytest.raises(InputError, match="init must be"):
        other.train(max_epochs=1, init="random", progress_bar=False)
    stopper = ConvergenceStopper(window=10, rtol=1e-3, patience=1, min_epochs=30)
    flat = [stopper.update(100.0) for _ in range(40)]
    assert flat.index(True) == 29  # first window check at or after min_epochs
    falling = ConvergenceStopper(window=10, rtol=1e-3, patience=1, min_epochs=0)
    assert not any(falling.update(1000.0 * 0.9**i) for i in range(100))


def test_adam_matches_torch():
    from napari_cell2location._infer._training import Adam

    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    ours, ref = Adam(a, lr=0.05), torch.optim.Adam(b, lr=0.05)
    for _ in range(20):
        for params, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss = (params[0] ** 2).sum() + (params[1].sin()).sum() + (params[0].sum() * params[1].mean()) ** 2
            loss.backward()
            opt.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_nuclei_counts_observed_pull_spot_totals(tiny, tmp_path):
    adata, sig, w = tiny
    truth = w.sum(1)
    counts = np.round(truth)
    with pytest.raises(InputError, match="one per spot"):
        Cell2location(adata, sig, nuclei_counts=counts[:5])
    with pytest.raises(InputError, match="non-negative"):
        Cell2location(adata, sig, nuclei_counts=-counts)
    r = {}
    for name, kw in (("without", {}), ("with", {"nuclei_counts": counts})):
        mod = Cell2location(adata, sig, N_cells_per_location=float(truth.mean()), **kw)
        mod.train(max_epochs=300, lr=0.02, progress_bar=False, seed=0)
        est = mod.posterior_quantile(0.5)["w_sf"].sum(1)
        r[name] = np.corrcoef(est, truth)[0, 1]
    assert r["with"] > r["without"] and r["with"] > 0.9, r
    mod.save(tmp_path / "m")
    back = Cell2location.load(tmp_path / "m", adata)
    torch.testing.assert_close(back.module.nuclei_counts, mod.module.nuclei_counts)


def test_dense_terms_gradient_matches_autograd():
    from napari_cell2location._infer._likelihood import _DenseNBTerms

    rng = np.random.default_rng(4)
    x = torch.tensor(rng.poisson(3, size=(6, 9)), dtype=torch.float64)
    mu = torch.tensor(rng.gamma(2, 2, size=(6, 9)), dtype=torch.float64, requires_grad=True)
    for alpha_shape in ((1, 9), (6, 9)):
        alpha = torch.tensor(rng.gamma(4, 1, size=alpha_shape), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_DenseNBTerms.apply, (mu, alpha, x))
        ref = (torch.xlogy(x, mu) - (alpha + x) * torch.log(alpha + mu)).sum(-1)
        torch.testing.assert_close(_DenseNBTerms.apply(mu, alpha, x), ref)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_validation_names_the_offending_entry(tiny, fmt):
    adata, sig, _ = tiny
    X = adata.X.toarray()
    X[3, 2] = 2.5
    from scipy import sparse

    adata.X = sparse.csr_matrix(X).asformat(fmt)
    with pytest.raises(InputError, match=r"'spot_3', gene 'gene_2'"):
        Cell2location(adata, sig)


@pytest.mark.parametrize("value,match", [(2.5, "2 non-integer"), (-1.0, "2 negative"), (np.nan, "2 NaN")])
def test_validation_in_chunks_counts_and_locates_across_chunks(tiny, monkeypatch, value, match):
    """Counts are checked a chunk of entries at a time; the message still counts every bad entry
    and names the first one, wherever the chunk boundaries fall."""
    from scipy import sparse

    from napari_cell2location.io import _validate

    monkeypatch.setattr(_validate, "_CHECK_CHUNK", 7)
    adata, sig, _ = tiny
    X = adata.X.toarray() + 1.0  # every entry stored
    X[40, 5] = value
    X[55, 70] = value
    adata.X = sparse.csr_matrix(X)
    with pytest.raises(InputError, match=rf"{match}.*'spot_40', gene 'gene_5'"):
        Cell2location(adata, sig)


def test_nnls_start_on_sparse_counts_matches_dense(tiny):
    """Below SPARSE_BELOW density the start is computed on the non-zero counts alone: same answer."""
    from scipy import sparse

    from napari_cell2location.model import _init

    adata, sig, _ = tiny
    X = adata.X.toarray()
    X[np.random.default_rng(0).random(X.shape) < 0.85] = 0  # ~10 % non-zero
    Xs = sparse.csr_matrix(X)
    assert Xs.nnz < _init.SPARSE_BELOW * X.size
    kw = {"detection_mean": np.array([0.3, 0.4]), "batch_index": np.arange(X.shape[0]) % 2, "chunk_size": 25}
    dense = _init.nnls_abundance(X, sig.to_numpy(), **kw)
    sparse_start = _init.nnls_abundance(Xs, sig.to_numpy(), **kw)
    np.testing.assert_allclose(sparse_start, dense, rtol=2e-3, atol=2e-3)
    assert dense.max() > 1.0  # not all at the floor


def test_default_learning_rate_follows_the_mode(tiny, monkeypatch):
    """train(max_epochs=None) without lr runs at AUTO_LR; an explicit max_epochs at the original's 0.002."""
    from napari_cell2location._infer import _training
    from napari_cell2location.model import _cell2location

    seen = []

    class Recording(_training.Adam):
        def __init__(self, params, lr=1e-3, **kw):
            seen.append(lr)
            super().__init__(params, lr=lr, **kw)

    monkeypatch.setattr(_training, "Adam", Recording)
    adata, sig, _ = tiny
    mod = Cell2location(adata, sig)
    stopper = _cell2location.ConvergenceStopper(window=2, rtol=0.5, min_epochs=2)
    mod.train(max_epochs=None, progress_bar=False, device="cpu", early_stopping=stopper)
    mod.train(max_epochs=2, progress_bar=False, device="cpu")
    mod.train(max_epochs=2, lr=0.05, progress_bar=False, device="cpu")
    assert seen == [_cell2location.AUTO_LR, 0.002, 0.05]


def test_guide_set_up_keeps_nothing_the_size_of_the_counts(tiny):
    """The guide's prototype trace lives as long as the model: no (spots, genes) tensor in it."""
    adata, sig, _ = tiny
    mod = fitted(adata, sig, steps=1)
    nodes = mod.guide.prototype_trace.nodes.items()
    sizes = {n: s["value"].numel() for n, s in nodes if torch.is_tensor(s.get("value"))}
    assert sizes and max(sizes.values()) < mod.n_obs * mod.n_vars, sizes


def test_history_plot_shows_the_trend_through_noisy_epochs():
    """The running median follows the trend of a loss whose late epochs swing widely, and the y axis is
    fitted to the trend and the bulk of the values, not to single outlying draws."""
    import matplotlib

    matplotlib.use("Agg")
    from napari_cell2location.plotting import plot_history, running_median

    rng = np.random.default_rng(0)
    epochs = np.arange(900)
    trend = 600_000 + 300_000 * np.exp(-epochs / 30)
    noise = rng.normal(0, 1, 900) * np.where(epochs > 400, 70_000, 3_000)
    noise[[500, 650, 820]] = -450_000  # a few draws far below the plateau
    ax = plot_history(trend + noise)
    median = ax.lines[1].get_ydata()
    assert np.median(np.abs(median[450:] - trend[450:])) < 20_000
    low, high = ax.get_ylim()
    assert low > 300_000 and high >= median.max()
    assert np.allclose(running_median([1, 100, 1, 1, 1], 3), [50.5, 1, 1, 1, 1])
