"""What a saved :class:`~napari_cell2location.model.Cell2location` keeps besides the guide, and how it is
rebuilt: the hooks :meth:`PyroEstimator.save` and ``load`` call (``_save_attrs``, ``_save_files``,
``_from_saved``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._infer import json_ready, to_numpy
from .._variants import ModelVariant
from ..io import InputError, atomic_output, reading


class SavedCell2location:
    """Persistence of Cell2location (a mixin: the model's attributes and ``_build``)."""

    def _save_attrs(self) -> dict:
        module = self.module
        return {
            "model_class": self.model_class.__name__,
            "model_kwargs": json_ready(
                {**self.model_kwargs, "detection_mean": to_numpy(module.detection_mean).ravel()}
            ),
            "detection_mean_per_sample": self.detection_mean_per_sample,
            "detection_mean_correction": self.detection_mean_correction,
            "nuclei_counts_weight": module.nuclei_counts_weight,
            "nuclei_counts": json_ready(
                None if module.nuclei_counts is None else to_numpy(module.nuclei_counts).ravel()
            ),
            "layer": self.layer,
            "batch_key": self.batch_key,
            "obs_names": list(self.obs_names),
            "factor_names": self.factor_names_,
        }

    def _save_files(self, path) -> None:
        with atomic_output(path / "cell_state_df.csv") as tmp:
            self.cell_state_df.to_csv(tmp)

    @classmethod
    def _from_saved(cls, path, attrs: dict, adata):
        if not pd.Index(adata.obs_names.astype(str)).equals(pd.Index(attrs["obs_names"])):
            raise InputError("adata's spots differ from those the model was trained on")
        with reading(path / "cell_state_df.csv", "saved signatures table"):
            cell_state_df = pd.read_csv(path / "cell_state_df.csv", index_col=0)
        cell_state_df.index = cell_state_df.index.astype(str)
        kwargs = dict(attrs["model_kwargs"])
        for key in ("N_cells_per_location", "detection_mean"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = np.asarray(kwargs[key])
        obj = cls.__new__(cls)
        obj._build(
            adata,
            cell_state_df,
            ModelVariant.of(attrs["model_class"]),
            {k: attrs[k] for k in ("layer", "batch_key") if attrs.get(k) is not None},
            attrs["detection_mean_per_sample"],
            attrs["detection_mean_correction"],
            attrs.get("nuclei_counts"),
            attrs.get("nuclei_counts_weight", 100.0),
            kwargs,
        )
        if list(obj.var_names) != list(cell_state_df.index):
            raise InputError("adata's genes do not match the saved model's genes")
        return obj
