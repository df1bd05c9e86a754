"""The fused ELBO (model/_elbo.py) against Pyro's Trace_ELBO on the same draws."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from napari_cell2location import Cell2location
from napari_cell2location.model import Cell2locationModule, NoFactorisationModule, NoMGModule
from napari_cell2location.model._elbo import MeanFieldELBO


def _trained(tiny, model_class, nuclei=False):
    adata, sig, _ = tiny
    adata = adata.copy()
    Cell2location.setup_anndata(adata, batch_key="sample")
    mod = Cell2location(adata, sig, model_class=model_class, N_cells_per_location=5.0)
    if nuclei:
        mod.module.set_nuclei_counts(np.random.default_rng(0).poisson(5, mod.n_obs), 100.0)
    mod.train(max_epochs=3, lr=0.01, progress_bar=False, device="cpu", seed=0)  # guide away from its start
    mod.module.train()
    return mod


def _pyro_loss_and_draws(module, guide, args):
    """Trace_ELBO's single-sample loss, and the unconstrained draws it used."""
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        guide_tr = poutine.trace(guide).get_trace(*args)
        model_tr = poutine.trace(poutine.replay(module, trace=guide_tr)).get_trace(*args)
        loss = -(model_tr.log_prob_sum() - guide_tr.log_prob_sum())
    suffix = "_unconstrained"
    draws = {n[: -len(suffix)]: s["value"].detach() for n, s in guide_tr.nodes.items() if n.endswith(suffix)}
    return loss, draws


@pytest.mark.parametrize(
    "model_class,nuclei",
    [(Cell2locationModule, True), (Cell2locationModule, False), (NoFactorisationModule, False), (NoMGModule, False)],
)
@pytest.mark.parametrize("minibatch", [False, True])
def test_fused_elbo_equals_trace_elbo(tiny, model_class, nuclei, minibatch):
    mod = _trained(tiny, model_class, nuclei)
    if minibatch:
        args = mod._batch_args(np.arange(0, mod.n_obs, 3), "cpu")  # plate scale 3
    else:
        args = mod._full_args("cpu")
    params = list(mod.guide.parameters())
    ref, draws = _pyro_loss_and_draws(mod.module, mod.guide, args)
    assert set(draws) == {name for name, _ in mod.guide.prototype_trace.iter_stochastic_nodes()}
    fused = MeanFieldELBO(mod.module, mod.guide)(*args, unconstrained=draws)
    assert float(fused) == pytest.approx(float(ref), rel=1e-5)
    g_ref = torch.autograd.grad(ref, params)
    g_fused = torch.autograd.grad(fused, params)
    for a, b in zip(g_ref, g_fused, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-6)


def test_fused_elbo_draws_fresh_noise_and_averages_particles(tiny):
    mod = _trained(tiny, Cell2locationModule)
    args = mod._full_args("cpu")
    one = MeanFieldELBO(mod.module, mod.guide)
    torch.manual_seed(0)
    a, b = float(one(*args)), float(one(*args))
    assert a != b  # a new draw each call
    torch.manual_seed(0)
    four = MeanFieldELBO(mod.module, mod.guide, num_particles=4)
    torch.manual_seed(0)
    singles = [float(one(*args)) for _ in range(4)]
    torch.manual_seed(0)
    assert float(four(*args)) == pytest.approx(np.mean(singles), rel=1e-5)


def test_both_elbos_train_to_the_same_place(tiny):
    """Same data, seed and steps: the fused path and Pyro's path reach a similar loss and abundances."""
    adata, sig, w_true = tiny
    results = {}
    for pyro_elbo in (False, True):
        ad = adata.copy()
        Cell2location.setup_anndata(ad, batch_key="sample")
        mod = Cell2location(ad, sig, N_cells_per_location=5.0)
        mod.pyro_elbo = pyro_elbo
        mod.train(max_epochs=300, lr=0.01, progress_bar=False, device="cpu", seed=1)
        mod.export_posterior(ad, use_quantiles=True, add_to_obsm=["means"])
        w = ad.obsm["means_cell_abundance_w_sf"].to_numpy()
        results[pyro_elbo] = (np.mean(mod._history[-20:]), w)
    loss_fused, w_fused = results[False]
    loss_pyro, w_pyro = results[True]
    assert loss_fused == pytest.approx(loss_pyro, rel=0.02)
    assert np.corrcoef(w_fused.ravel(), w_pyro.ravel())[0, 1] > 0.95
    assert np.corrcoef(w_fused.ravel(), w_true.ravel())[0, 1] > 0.6


def test_fused_elbo_needs_a_set_up_guide(tiny):
    adata, sig, _ = tiny
    ad = adata.copy()
    Cell2location.setup_anndata(ad)
    mod = Cell2location(ad, sig)
    with pytest.raises(RuntimeError, match="set the guide up"):
        MeanFieldELBO(mod.module, mod.guide)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("with_m", [True, False])
@pytest.mark.parametrize("n_batch", [1, 3])
def test_fused_nb_terms_value_and_gradients_in_chunks(monkeypatch, with_m, n_batch, keep):
    """The chunked mean + NB terms equal the plain formula, and their hand-written backward passes
    gradcheck, with rows split over several chunks, intermediates kept or recomputed."""
    from napari_cell2location._infer import _likelihood

    monkeypatch.setattr(_likelihood, "FUSED_CHUNK_ELEMENTS", 20)  # 7 genes: 2 rows a chunk
    monkeypatch.setattr(_likelihood, "FUSED_KEEP_ELEMENTS", 10**6 if keep else 0)
    gen = torch.Generator().manual_seed(0)
    n, G, F = 9, 7, 3
    d = torch.float64

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=d) + 0.2).requires_grad_()

    w, y, s_add, alpha = rand(n, F), rand(n, 1), rand(n_batch, G), rand(n_batch, G) * 5
    m = rand(1, G) if with_m else None
    g = torch.rand(F, G, generator=gen, dtype=d) + 0.1
    x = torch.poisson(torch.full((n, G), 2.0, dtype=d), generator=gen)
    batch = torch.arange(n) % n_batch
    ob = torch.nn.functional.one_hot(batch, n_batch).to(d) if n_batch > 1 else None

    expected = w @ g * (m if m is not None else 1.0)
    mu = (expected + (s_add[batch] if n_batch > 1 else s_add)) * y
    a = alpha[batch] if n_batch > 1 else alpha
    ref = (x * torch.log(mu) - (a + x) * torch.log(a + mu)).sum()
    fused = _likelihood._FusedNBTerms.apply(w, m, s_add, y, alpha, g, x, ob)
    torch.testing.assert_close(fused, ref)
    inputs = (w, m, s_add, y, alpha) if with_m else (w, s_add, y, alpha)

    def f(*args):
        if with_m:
            return _likelihood._FusedNBTerms.apply(*args, g, x, ob)
        w_, s_, y_, a_ = args
        return _likelihood._FusedNBTerms.apply(w_, None, s_, y_, a_, g, x, ob)

    assert torch.autograd.gradcheck(f, inputs)


def test_fused_elbo_equals_trace_elbo_when_recomputing_in_chunks(tiny, monkeypatch):
    """Large-data settings (intermediates recomputed in backward, many row chunks) on tiny data."""
    from napari_cell2location._infer import _likelihood

    monkeypatch.setattr(_likelihood, "FUSED_CHUNK_ELEMENTS", 800)  # 80 genes: 10 rows a chunk
    monkeypatch.setattr(_likelihood, "FUSED_KEEP_ELEMENTS", 0)
    test_fused_elbo_equals_trace_elbo(tiny, Cell2locationModule, True, False)


def test_counts_pattern_grouped_in_chunks_matches_one_pass(monkeypatch):
    """Grouping (batch, gene, count) a few rows at a time and merging gives the same groups, and
    the fused likelihood's pattern (no per-entry arrays) the same lgamma total as the per-entry sum."""
    from napari_cell2location._infer import _likelihood

    rng = np.random.default_rng(3)
    x = torch.tensor(rng.negative_binomial(2, 0.4, size=(11, 13)), dtype=torch.float32)
    batch = torch.tensor(rng.integers(0, 3, 11))
    alpha = torch.tensor(rng.gamma(5, 1, size=(3, 13)), dtype=torch.float32)
    one_pass = _likelihood.CountsPattern(x, batch, grouped=True)
    monkeypatch.setattr(_likelihood, "FUSED_CHUNK_ELEMENTS", 30)  # 2 rows a chunk
    chunked = _likelihood.CountsPattern(x, batch, grouped=True, entries=False)
    per_entry = _likelihood.CountsPattern(x, batch)  # not grouped: one term per non-zero entry
    assert not hasattr(chunked, "flat_idx") and chunked.nnz == per_entry.nnz == int((x > 0).sum())
    for name in ("group_value", "group_batch", "group_col", "group_count", "lgamma_x_plus_1"):
        torch.testing.assert_close(getattr(chunked, name), getattr(one_pass, name))
    assert int(chunked.group_count.sum()) == chunked.nnz
    torch.testing.assert_close(chunked.lgamma_total(alpha), per_entry.lgamma_total(alpha))
    torch.testing.assert_close(chunked.lgamma_x_plus_1, torch.lgamma(x + 1).sum(-1))
