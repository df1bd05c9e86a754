"""Which full-resolution image belongs to a Space Ranger folder, and where an image opened on its own sits.

The image is opened by :func:`~._fullres.open_fullres_image` (a lazy :class:`~._fullres.Pyramid`); this module
holds the rule that finds it (:func:`find_fullres_image`), for a Space Ranger folder, in this order:

1. the path the user gives (``image=``; napari: drop the TIFF onto the open section, or open the folder and
   the TIFF together);
2. the image the run itself recorded: ``--image`` in the run folder's ``_cmdline`` or the
   ``tissue_image_paths`` of its ``_invocation`` (the run folder holds ``outs/``), when that file exists
   (a relative path is taken from the folder above the run folder, where Space Ranger was started);
3. a TIFF (``.tif``, ``.tiff``, ``.btf``, ``.svs``, ``.ndpi``, ``.qptiff``) in ``outs/spatial/``, ``outs/``
   or the run folder, other than the images Space Ranger writes itself (``cytassist_image.tiff``), by
   folder in that order and by name.

A Visium HD run has no count matrix in ``outs/`` (its counts are in ``outs/binned_outputs/square_NNNum/``):
the rule is the same with its ``outs/`` found from any of the folders it reads (the run folder, ``outs/``,
``binned_outputs/`` or one bin's folder; a bin folder copied on its own is its own ``outs/``). Space Ranger
registers the bins to the ``--image`` given (the microscope H&E, not ``--cytaimage``), so that image is the
full-resolution frame of every bin size.

The first found image that fits the folder is used (:func:`frame_mismatch`): its size must match the
full-resolution frame the hires (or lowres) image and its scale factor imply, or, without those, hold
every spot. A found image that does not fit is skipped with a warning; a given one is an
:class:`InputError`.

:func:`place_on_sections` places an image opened on its own (dropped onto the viewer) with the section it
belongs to.

Nothing here imports Qt or napari, nor reads pixels: images are opened by :mod:`._fullres`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._fullres import Pyramid, is_tiff_name, open_fullres_image
from ._validate import InputError

logger = logging.getLogger(__name__)

#: images Space Ranger writes into its outputs itself (never the full-resolution input)
_SPACERANGER_OWN = ("cytassist_image.tiff", "cytassist_image.tif")


def _run_folder(root: Path) -> Path:
    """The Space Ranger run folder: the one holding ``outs/`` (``root`` itself when it is not ``outs``)."""
    return root.parent if root.name == "outs" else root


def recorded_image_paths(run: str | os.PathLike) -> list[Path]:
    """Full-resolution image paths a Space Ranger run folder records: ``--image`` in ``_cmdline`` and the
    ``tissue_image_paths`` of ``_invocation`` (relative ones taken from the folder above ``run``)."""
    run = Path(run)
    found: list[str] = []
    cmdline = run / "_cmdline"
    if cmdline.is_file():
        try:
            words = shlex.split(cmdline.read_text(errors="replace"))
        except ValueError:
            words = cmdline.read_text(errors="replace").split()
        for i, word in enumerate(words):
            if word.startswith("--image="):
                found.append(word.split("=", 1)[1])
            elif word == "--image" and i + 1 < len(words):
                found.append(words[i + 1])
    invocation = run / "_invocation"
    if invocation.is_file():
        text = invocation.read_text(errors="replace")
        block = re.search(r"tissue_image_paths\"?\s*[=:]\s*\[([^\]]*)\]", text)
        if block:
            found.extend(re.findall(r'"([^"]+)"', block.group(1)))
    paths = []
    for p in found:
        p = Path(p).expanduser()
        paths.append(p if p.is_absolute() else run.parent / p)
    return paths


def _nearby_tiffs(root: Path) -> list[Path]:
    run = _run_folder(root)
    seen, out = set(), []
    for folder in (root / "spatial", root, run):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and is_tiff_name(p) and p.name.lower() not in _SPACERANGER_OWN and p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
    return out


def _outs_of(folder: str | os.PathLike) -> Path | None:
    """The ``outs/`` folder of Space Ranger output (standard Visium or Visium HD) that ``folder`` is part of."""
    from ._spaceranger import spaceranger_root
    from ._visium_hd import _locate

    hd = _locate(folder)  # first, as spatial_format: an HD bin folder also holds a matrix and spatial/
    return hd.outs if hd is not None else spaceranger_root(folder)


def find_fullres_image(folder: str | os.PathLike) -> list[Path]:
    """Candidate full-resolution images of a Space Ranger folder, in the order of the rule (module docstring).

    Parameters
    ----------
    folder : str or os.PathLike
        A Space Ranger ``outs/`` folder or its run folder; for Visium HD also ``binned_outputs/`` or one
        bin's folder (``square_008um/``).

    Returns
    -------
    list of pathlib.Path
        Existing files: those the run recorded first, then the TIFFs beside the outputs (none are opened).
        Empty when ``folder`` is not Space Ranger output or nothing is there.
    """
    root = _outs_of(folder)
    if root is None:
        return []
    recorded = [p for p in recorded_image_paths(_run_folder(root)) if p.is_file()]
    nearby = [p for p in _nearby_tiffs(root) if p.resolve() not in {r.resolve() for r in recorded}]
    return recorded + nearby


def frame_mismatch(
    shape: Sequence[int],
    scalefactors: Mapping[str, Any] | None = None,
    image_shapes: Mapping[str, Sequence[int]] | None = None,
    spatial_xy=None,
) -> str | None:
    """Why an image of ``shape`` is not the full-resolution frame of a Visium section (None when it fits).

    Parameters
    ----------
    shape : sequence of int
        (H, W, ...) of the candidate image's finest level.
    scalefactors : mapping, optional
        ``scalefactors_json.json`` of the section.
    image_shapes : mapping, optional
        Shapes of its ``'hires'`` / ``'lowres'`` images: with the scale factor they imply the full-resolution
        size (Space Ranger made them from it), which must match within one image pixel and 2 %.
    spatial_xy : array-like, optional
        (n_obs, 2) spot centres (x, y) in full-resolution pixels; without a hires / lowres image they must
        all lie inside the image.

    Returns
    -------
    str or None
    """
    h, w = int(shape[0]), int(shape[1])
    scalefactors = dict(scalefactors or {})
    for key in ("hires", "lowres"):
        small = (image_shapes or {}).get(key)
        scalef = scalefactors.get(f"tissue_{key}_scalef")
        if small is None or not scalef:
            continue
        exp_h, exp_w = small[0] / float(scalef), small[1] / float(scalef)
        tol_h, tol_w = 1.0 / float(scalef) + 0.02 * exp_h, 1.0 / float(scalef) + 0.02 * exp_w
        if abs(h - exp_h) > tol_h or abs(w - exp_w) > tol_w:
            return (
                f"it is {w:,} x {h:,} px, but the section's {key} image ({small[1]} x {small[0]} px at scale "
                f"{float(scalef):.4g}) was made from a {exp_w:,.0f} x {exp_h:,.0f} px image"
            )
        return None
    if spatial_xy is not None and len(spatial_xy):
        xy = np.asarray(spatial_xy, dtype=float)
        xy = xy[np.isfinite(xy).all(1)]
        if len(xy) and (xy.min() < -0.5 or xy[:, 0].max() > w - 0.5 or xy[:, 1].max() > h - 0.5):
            return (
                f"it is {w:,} x {h:,} px, but the spots reach x = {xy[:, 0].max():,.0f}, y = {xy[:, 1].max():,.0f} "
                "full-resolution px"
            )
    return None


def _section_frame(adata) -> tuple[dict, dict, Any]:
    """Scale factors, hires / lowres image shapes and spot positions of a one-library scanpy AnnData."""
    spatial = adata.uns.get("spatial", {}) if hasattr(adata, "uns") else {}
    entry = next(iter(spatial.values()), {}) if hasattr(spatial, "values") and len(spatial) else {}
    images = {k: np.shape(v) for k, v in (entry.get("images", {}) or {}).items() if v is not None}
    xy = adata.obsm["spatial"] if "spatial" in getattr(adata, "obsm", {}) else None
    return dict(entry.get("scalefactors", {}) or {}), images, xy


def fullres_image_for(folder: str | os.PathLike, image: str | os.PathLike | None = None, adata=None) -> Pyramid | None:
    """The full-resolution image of a Space Ranger folder, opened lazily: the given one, else the one the
    rule finds (:func:`find_fullres_image`), when it fits the section (:func:`frame_mismatch`).

    Parameters
    ----------
    folder : str or os.PathLike
        The Space Ranger ``outs/`` folder (or its run folder); for Visium HD also ``binned_outputs/`` or one
        bin's folder.
    image : str or os.PathLike, optional
        The image given with Space Ranger's ``--image``; default: found by the rule.
    adata : anndata.AnnData, optional
        The folder as read by :func:`~napari_cell2location.io.read_spaceranger` (or, Visium HD,
        :func:`~napari_cell2location.io.read_visium_hd`; read here when not given), for the frame check.

    Returns
    -------
    Pyramid or None
        None when no image is given and none that fits is found.

    Raises
    ------
    InputError
        When the given image cannot be opened or does not fit the section (the message says how).
    """
    if adata is None:
        from ._spaceranger import read_spaceranger
        from ._visium_hd import is_visium_hd, read_visium_hd

        adata = read_visium_hd(folder) if is_visium_hd(folder) else read_spaceranger(folder)
    scalefactors, shapes, xy = _section_frame(adata)
    if image is not None:
        pyramid = open_fullres_image(image)
        reason = frame_mismatch(pyramid.shape, scalefactors, shapes, xy)
        if reason:
            pyramid.close()
            raise InputError(
                f"{str(image)!r} is not the full-resolution image of {str(folder)!r}: {reason}. Give the image "
                "passed to Space Ranger with --image."
            )
        return pyramid
    for candidate in find_fullres_image(folder):
        try:
            pyramid = open_fullres_image(candidate)
        except InputError as err:
            logger.warning("skipped %s as the full-resolution image: %s", candidate.name, err)
            continue
        reason = frame_mismatch(pyramid.shape, scalefactors, shapes, xy)
        if reason is None:
            logger.info("full-resolution image of %s: %s", folder, candidate)
            return pyramid
        pyramid.close()
        logger.warning("skipped %s as the full-resolution image of %s: %s", candidate.name, folder, reason)
    return None


def place_on_sections(shape: Sequence[int], sections: Iterable[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """Affine (3, 3) from a full-resolution image's pixels to world, for an image opened on its own.

    World coordinates are full-resolution pixels, so the image sits at the identity, moved with the
    section it belongs to when sections were placed side by side: the first section image whose world
    extent is the image's size (within 2 %) gives its translation.

    Parameters
    ----------
    shape : sequence of int
        (H, W, ...) of the image's finest level.
    sections : iterable of (shape, affine)
        Images already shown: their (h, w, ...) and (3, 3) affine from their pixels to world.

    Returns
    -------
    numpy.ndarray
        (3, 3) affine: the identity, or a translation.
    """
    h, w = float(shape[0]), float(shape[1])
    out = np.eye(3)
    for other_shape, affine in sections:
        affine = np.asarray(affine, dtype=float)
        scale = np.sqrt(np.abs(np.linalg.det(affine[:2, :2])))
        if not scale > 0 or not np.allclose(affine[:2, :2], np.diag([scale, scale]), rtol=1e-6):
            continue
        eh, ew = other_shape[0] * scale, other_shape[1] * scale
        tol = {"rel_tol": 0.02, "abs_tol": 2 * scale}
        if math.isclose(eh, h, **tol) and math.isclose(ew, w, **tol):
            out[:2, 2] = affine[:2, 2]
            return out
    return out
