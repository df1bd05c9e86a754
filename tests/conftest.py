"""Shared fixtures: tiny count data generated from the model's own assumptions."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

# the test machine has 2 shared cores: one intra-op thread avoids spin contention on tiny tensors
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def make_tiny(n_obs=60, n_vars=80, n_factors=4, n_batch=2, seed=0):
    """Small spatial AnnData + signatures with known abundances (not the full synthetic section)."""
    import anndata
    from scipy import sparse

    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.6, 1.0, size=(n_vars, n_factors)) * 3.0
    for f in range(n_factors):  # a few markers per type
        sig[rng.choice(n_vars, 5, replace=False), f] *= 8
    w = rng.gamma(0.4, 5.0, size=(n_obs, n_factors)) * (rng.random((n_obs, n_factors)) < 0.7)
    mu = (w @ sig.T) * 0.3 + 0.05
    X = rng.negative_binomial(10, 10 / (10 + mu)).astype(np.float32)
    adata = anndata.AnnData(sparse.csr_matrix(X))
    adata.obs_names = [f"spot_{i}" for i in range(n_obs)]
    adata.var_names = [f"gene_{i}" for i in range(n_vars)]
    adata.obs["sample"] = pd.Categorical([f"s{i % n_batch}" for i in range(n_obs)])
    adata.obs["other"] = 1.0
    signatures = pd.DataFrame(sig, index=adata.var_names, columns=[f"Type{f}" for f in range(n_factors)])
    return adata, signatures, w


def make_reference(n_cells=90, n_genes=40, n_types=3, seed=0):
    """Small labelled single-cell reference: Poisson counts of ``n_types`` types (obs 'ct', 'batch')."""
    import anndata
    from scipy import sparse

    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.8, 2.0, size=(n_types, n_genes))
    labels = rng.integers(0, n_types, n_cells)
    X = rng.poisson(sig[labels]).astype(np.float32)
    ad = anndata.AnnData(sparse.csr_matrix(X))
    ad.obs_names = [f"cell_{i}" for i in range(n_cells)]
    ad.var_names = [f"g{i}" for i in range(n_genes)]
    ad.obs["ct"] = pd.Categorical([f"T{t}" for t in labels])
    ad.obs["batch"] = pd.Categorical([f"b{i % 2}" for i in range(n_cells)])
    return ad


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(name="make_tiny")
def _make_tiny_factory():
    """The :func:`make_tiny` factory, for tests that need tiny data of another size or seed."""
    return make_tiny


@pytest.fixture
def small_reference():
    """A fresh :func:`make_reference` (90 cells x 40 genes, 3 types in obs 'ct')."""
    return make_reference()


@pytest.fixture(scope="session")
def shared_data():
    """Path of the shared data folder (``../shared/data`` next to the repository; it may be absent)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_path(shared_data):
    """``shared_path(*parts, reason=...)``: a path inside the shared data folder; skips the test when
    that path is absent."""

    def get(*parts, reason="shared data folder not present"):
        path = os.path.join(shared_data, *parts)
        if not os.path.exists(path):
            pytest.skip(reason)
        return path

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_EXIT_STATUS = {"value": None}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["value"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without running interpreter teardown once pytest has reported.

    Seen here: after a full run had passed and printed its summary, the process occasionally died
    with SIGSEGV while Python tore down Qt/napari objects and torch's thread pools (never during a
    test). The tests' outcome is already final, so exit with pytest's own status instead.
    """
    import sys

    status = _EXIT_STATUS["value"]
    if status is None or "PyQt6" not in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
