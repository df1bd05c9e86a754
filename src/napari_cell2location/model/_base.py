"""What the spatial model (:class:`Cell2location`) and the reference regression
(:class:`~napari_cell2location.reference.RegressionModel`) share as owners of a trained guide:
training bookkeeping, the loss history, guide summaries, and saving / loading the guide.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._posterior import GuideSummary
from ._training import consume


class GuideOwner:
    """Mixin for a model object with ``module``, ``guide`` (AutoNormal), ``_history`` (list of
    per-epoch losses), ``is_trained_``, ``_summary`` and ``_ensure_guide(device)``."""

    #: file of the guide parameters inside a saved model's folder
    PARAMS_FILE = "model_params.pt"

    def _guarded_training(self, steps):
        """Yield from a training generator; afterwards (also when closed early) record whether
        any epoch ran and drop the cached guide summary."""
        n_before = len(self._history)
        try:
            yield from steps
        finally:
            self.is_trained_ = self.is_trained_ or len(self._history) > n_before
            self._summary = None

    def _train_to_end(self, make_steps, kwargs: dict, allowed: set, progress_bar: bool, desc: str):
        """``train()``'s body: refuse keyword arguments outside ``allowed``, then run the generator
        ``make_steps()`` (``iter_train``) to the end, with a tqdm bar when ``progress_bar``; returns self."""
        unknown = set(kwargs) - set(allowed)
        if unknown:
            raise TypeError(f"train() got unexpected arguments {sorted(unknown)}; accepted: {sorted(allowed)}")
        consume(make_steps(), progress_bar, desc)
        return self

    @property
    def history_(self) -> dict:
        """``{'elbo_train': DataFrame}``: the training loss (negative ELBO) of each epoch."""
        return {"elbo_train": pd.DataFrame({"elbo_train": np.asarray(self._history, dtype=float)})}

    def plot_history(self, iter_start: int = 0, iter_end: int = -1, ax=None):
        """Plot the training loss; returns the matplotlib Axes."""
        from ..plotting import plot_history

        return plot_history(self.history_, iter_start=iter_start, iter_end=iter_end, ax=ax)

    def _guide_summary(self) -> GuideSummary:
        if self.guide.prototype_trace is None:
            raise RuntimeError("the model has not been trained yet: call train() first")
        if self._summary is None:
            obs = set(self.module.list_obs_plate_vars()["sites"])
            self._summary = GuideSummary(self.guide, obs)
        return self._summary

    # ------------------------------------------------------------------ persistence
    def _write_saved(self, dir_path, overwrite: bool, attrs: dict) -> Path:
        """Write the guide parameters and ``attrs`` (JSON-ready) to a model folder; returns its path."""
        path = Path(dir_path)
        if (path / "attr.json").exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it")
        if self.guide.prototype_trace is None:
            raise RuntimeError("nothing to save: the model has not been trained")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.guide.state_dict().items()}
        torch.save({"guide": state}, path / self.PARAMS_FILE)
        with open(path / "attr.json", "w") as fh:
            json.dump({**attrs, "history": list(self._history)}, fh)
        return path

    @classmethod
    def _read_saved(cls, dir_path) -> tuple[Path, dict]:
        """The folder and ``attr.json`` of a saved model of this class."""
        path = Path(dir_path)
        if not (path / "attr.json").exists():
            raise FileNotFoundError(f"{path} does not hold a saved {cls.__name__} (no attr.json)")
        with open(path / "attr.json") as fh:
            return path, json.load(fh)

    def _restore_guide(self, path: Path, attrs: dict, device) -> None:
        """Set the guide up on ``device`` and load the saved parameters and history (no training step)."""
        self._ensure_guide(device)
        state = torch.load(path / self.PARAMS_FILE, map_location=self.device, weights_only=True)
        self.guide.load_state_dict(state["guide"])
        self._history = [float(v) for v in attrs["history"]]
        self.is_trained_ = True


@contextmanager
def temporary_uns(adata, key: str, value):
    """Set ``adata.uns[key]`` for the ``with`` block, then restore what was there (or remove it)."""
    had = key in adata.uns
    old = adata.uns.get(key)
    adata.uns[key] = value
    try:
        yield
    finally:
        if had:
            adata.uns[key] = old
        else:
            del adata.uns[key]
