"""The fit pipeline over the processes of a data-parallel fit (``torchrun``; see ``_infer/_distributed.py``).

Every process is given the whole section and keeps its shard of the spots (a contiguous block);
the model of each shard is built with the prior the whole section gives (detection_mean), trained
with the global parameters kept equal across processes, and exported on its own spots. Rank 0 then
gathers the exports into the section, in spot order: the per-spot summaries (obsm, the per-spot
arrays of ``uns['mod']``, the QC) are concatenated, the global ones are the same on every process.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pandas as pd

from .._contract import QC_KEY, abundance_key
from .._infer import DataParallel, Stage, to_numpy
from ..io import InputError
from ._cell2location import Cell2location
from ._priors import counts_per_cell, detection_from

logger = logging.getLogger(__name__)


def _shard_settings(settings, part: slice, n_obs: int):
    """The settings of one shard: per-spot N in spot order is cut to the shard (by name: kept whole)."""
    n_cells = settings.n_cells_per_location
    if np.ndim(n_cells) == 1 and not isinstance(n_cells, pd.Series):
        n_cells = np.asarray(n_cells)
        if len(n_cells) != n_obs:
            raise InputError(f"n_cells_per_location has {len(n_cells)} values for {n_obs} spots")
        n_cells = n_cells[part]
    return replace(settings, n_cells_per_location=n_cells)


def shard_summary(mod: Cell2location) -> tuple:
    """What one shard's model (built on its spots alone) tells the others about the whole section: its genes
    with counts, its batches, the sum over its spots of total counts / N_cells_per_location, its spots."""
    if np.ndim(mod.model_kwargs["detection_mean"]):
        raise InputError("a data-parallel fit takes one detection_mean for all sections (not per sample)")
    per_cell = counts_per_cell(mod.X, to_numpy(mod.module.N_cells_per_location).ravel())  # the N in force
    return list(mod.var_names), list(mod.batch_names), float(per_cell.sum()), mod.n_obs


def section_inputs(parts: list[tuple], data_genes, signatures: pd.DataFrame) -> dict:
    """The whole section's model inputs from every shard's :func:`shard_summary`, as one process computes
    them on the whole section: genes with counts anywhere (in the data's order ``data_genes``), every
    batch, and detection_mean (the mean over all spots of total counts / N, over the mean signature total
    of those genes; ``spec/MODEL.md`` §1)."""
    order = {g: i for i, g in enumerate(pd.Index(data_genes).astype(str))}
    genes = sorted(set().union(*(p[0] for p in parts)), key=order.__getitem__)
    batches = sorted(set().union(*(p[1] for p in parts)))
    per_cell = sum(p[2] for p in parts) / sum(p[3] for p in parts)
    detection = detection_from(per_cell, signatures.reindex(genes))
    return {"genes": genes, "batch_names": batches, "detection_mean": detection}


def shard_model(local, signatures: pd.DataFrame, settings, parallel: DataParallel) -> Cell2location:
    """The model of this process's shard ``local`` (its spots only; every process calls this together),
    built with what the whole section gives it: its genes, batches and detection_mean.

    For callers that hold only their shard (never the whole section), e.g. ``benchmarks/scale.py``.
    """
    from ._pipeline import build_model  # the single-process pipeline's (which imports this module)

    mod = build_model(local, signatures, settings)
    parts = parallel.all_gather(shard_summary(mod))
    return build_model(local, signatures, settings, **section_inputs(parts, local.var_names, signatures))


def _merge_uns(parts: list[dict], local_sites: set[str]) -> dict:
    """``uns['mod']`` of the whole section from each shard's: per-spot arrays joined in rank order."""
    out = dict(parts[0])
    out["obs_names"] = np.concatenate([p["obs_names"] for p in parts])
    for key, value in parts[0].items():
        if not (key.startswith("post_sample_") and isinstance(value, dict)):
            continue
        merged = {}
        for site in value:
            arrays = [np.asarray(p[key][site]) for p in parts]
            same = all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0]) for a in arrays[1:])
            merged[site] = np.concatenate(arrays) if site in local_sites or not same else arrays[0]
        out[key] = merged
    return out


def iter_fit_parallel(adata, signatures: pd.DataFrame, settings, parallel: DataParallel, stopper):
    """:func:`~napari_cell2location.model.iter_fit` as one process of a data-parallel fit.

    ``stopper`` is the fast mode's (or None). Returns a FitResult: on rank 0
    with the whole section's exports written into ``adata`` and the QC of every spot; elsewhere that
    of the shard (``adata`` is left as it was).
    """
    Cell2location.setup_anndata(adata, batch_key=settings.batch_key, layer=settings.layer)
    part = parallel.shard(adata.n_obs)
    local = adata[part].copy()
    mod = shard_model(local, signatures, _shard_settings(settings, part, adata.n_obs), parallel)
    yield Stage("model", mod)
    from ._pipeline import export_fit, train_fit  # the single-process pipeline's (which imports this module)

    yield from train_fit(mod, settings, stopper, parallel)
    yield Stage("exporting")
    result = export_fit(mod, local, settings)
    keys = [abundance_key(k) for k in settings.summaries] + [QC_KEY]
    parts = parallel.gather(({k: local.obsm[k] for k in keys}, local.uns["mod"], result.qc))
    if parts is None:
        return result
    for k in keys:
        adata.obsm[k] = pd.concat([p[0][k] for p in parts]).set_axis(adata.obs_names, axis=0)
    adata.uns["mod"] = _merge_uns([p[1] for p in parts], mod._local_sites())
    logger.info("gathered the exports of %d processes (%d spots)", parallel.world_size, adata.n_obs)
    return type(result)(mod, pd.concat([p[2] for p in parts], ignore_index=True))
