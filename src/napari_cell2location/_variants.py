"""The three Cell2location models, named once: for the Python API, the command line and the GUI.

Light on purpose (no torch import): the command line builds its ``--model`` choices and the Fit tab
its dropdown from :class:`ModelVariant` before any model is loaded.
"""

from __future__ import annotations

from enum import StrEnum


class ModelVariant(StrEnum):
    """A Cell2location model variant; its value is the short name the CLI takes (``--model``).

    :meth:`ModelVariant.of` also accepts the Pyro module class or its (original, long) class name.
    """

    MAIN = "main"
    NO_FACTORISATION = "no-factorisation"
    NO_MG = "no-mg"

    @property
    def class_name(self) -> str:
        """The original's name of the Pyro module."""
        return _VARIANTS[self][0]

    @property
    def label(self) -> str:
        """How the GUI names it."""
        return _VARIANTS[self][1]

    @property
    def module_class(self) -> type:
        """The Pyro module of this variant (imports torch and pyro)."""
        from .model import _modules

        return getattr(_modules, self.class_name)

    @classmethod
    def of(cls, value) -> ModelVariant:
        """The variant named by ``value``: a variant, its short name, its module class or class name;
        None is the main model."""
        if value is None:
            return cls.MAIN
        if isinstance(value, cls):
            return value
        name = value.__name__ if isinstance(value, type) else value
        for variant in cls:
            if name in (variant.value, variant.class_name):
                return variant
        from .io import InputError

        known = [v.value for v in cls] + [v.class_name for v in cls]
        raise InputError(f"unknown model_class {value!r}; choose one of {known}")


_VARIANTS = {
    ModelVariant.MAIN: (
        "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
        "main model",
    ),
    ModelVariant.NO_FACTORISATION: (
        "LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
        "no factorisation of w",
    ),
    ModelVariant.NO_MG: (
        "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel",
        "no gene-level m_g",
    ),
}
