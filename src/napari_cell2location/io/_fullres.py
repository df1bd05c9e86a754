"""Full-resolution histology: the scan given to Space Ranger with ``--image``, opened lazily as a pyramid.

Nuclei are resolved only on the full-resolution scan (about 0.25-1 µm per pixel, 10,000-60,000 px a side,
usually a tiled, pyramidal TIFF / OME-TIFF / SVS / NDPI), not on the hires and lowres PNGs of ``spatial/``.
:func:`open_fullres_image` opens such a file as a :class:`Pyramid` of lazy dask arrays (tifffile's zarr
store: only the TIFF tiles a slice touches are read and decoded), so neither napari nor the nuclei
detector ever holds the whole image.

Its pixels are Space Ranger's full-resolution pixels, the world coordinates of the spots
(``obsm['spatial']`` is (x, y) in those pixels): the image sits at the identity, level ``k`` of the pyramid at
scale ``shape[0] / shape_k`` (as napari places the levels of a multiscale layer).

Which image belongs to a Space Ranger folder (the rule that finds it next to the outputs, and the check that
it fits the section) is :mod:`._fullres_find`.

Nothing here imports Qt or napari; ``tifffile``, ``zarr`` and ``dask`` load inside the functions.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._files import describe_start, reading
from ._validate import InputError

logger = logging.getLogger(__name__)

#: file name endings of images tifffile reads (lower case)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".qptiff")
#: first bytes of a classic TIFF and a BigTIFF, both byte orders
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: a single-level image larger than this (longest side, px) gets lazy subsampled levels for display
VIRTUAL_LEVELS_ABOVE = 4096
#: the coarsest level of a pyramid made up for a single-level image has its longest side at most this
_COARSEST = 1024
#: a pixel size from the file's metadata outside this range (µm) is taken as meaningless (72 dpi defaults)
_PLAUSIBLE_UM_PER_PX = (0.01, 50.0)


def is_tiff_name(path: str | os.PathLike) -> bool:
    """Whether ``path``'s name ends like a TIFF (``.tif``, ``.ome.tiff``, ``.svs``, ``.ndpi``, ...)."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


class Pyramid(list):
    """The levels of a multiscale image, finest first: (H_k, W_k) or (H_k, W_k, C) lazy arrays.

    A list, as napari takes multiscale data (pass ``multiscale=True``: this list also answers ``shape``,
    ``ndim``, ``dtype`` and ``nbytes`` with those of its finest level, so code that asks an image for its
    size treats it as that level).

    Parameters
    ----------
    levels : sequence of array-like
        Finest first, each smaller than the one before.
    source : str or os.PathLike, optional
        The file the levels are read from.
    um_per_px : float, optional
        Size of a finest-level pixel in µm, when the file says it.
    handle : object, optional
        What must stay open while the levels are read (closed by :meth:`close`).

    Attributes
    ----------
    source : pathlib.Path or None
    um_per_px : float or None
    virtual : bool
        True when the coarser levels are subsampled views of a single-level file (each reads the finest).
    """

    def __init__(self, levels: Sequence, source=None, um_per_px: float | None = None, handle=None):
        super().__init__(levels)
        if not len(self):
            raise ValueError("a pyramid needs at least one level")
        self.source = Path(source) if source is not None else None
        self.um_per_px = um_per_px
        self.virtual = False
        self._handle = handle

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the finest level."""
        return tuple(int(s) for s in self[0].shape)

    @property
    def ndim(self) -> int:
        return len(self[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self[0].dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the finest level if it were read whole (it never is)."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def rgb(self) -> bool:
        """Whether the levels are (H, W, 3) or (H, W, 4) colour images."""
        return self.ndim == 3 and self.shape[-1] in (3, 4)

    @property
    def downsample(self) -> list[float]:
        """Finest-level pixels per pixel of each level (1.0 first), from the level heights."""
        return [self.shape[0] / float(level.shape[0]) for level in self]

    def close(self) -> None:
        """Close the file the levels are read from (they cannot be read afterwards)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __repr__(self) -> str:
        sizes = ", ".join("x".join(str(s) for s in level.shape[:2]) for level in self)
        where = f" from {self.source.name!r}" if self.source is not None else ""
        return f"Pyramid({len(self)} levels{where}: {sizes})"

    # a list compares by content: two pyramids are the same only when they are the same object
    __eq__ = object.__eq__
    __hash__ = object.__hash__


# ------------------------------------------------------------------------------------------------
# opening a TIFF
# ------------------------------------------------------------------------------------------------


def _check_tiff_file(path: Path) -> None:
    """Refuse a folder, an empty file or one that does not start like a TIFF, saying what it is."""
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder, not a full-resolution image (a TIFF file).")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head not in _TIFF_MAGIC:
        raise InputError(
            f"{str(path)!r} is not a TIFF image: this is {describe_start(path)}. The full-resolution image must be "
            "the (pyramidal) TIFF / OME-TIFF / SVS / NDPI scan given to Space Ranger with --image."
        )


def _check_complete(tif, path: Path) -> None:
    """A file cut short: the pixel data of some page ends beyond the end of the file."""
    size = path.stat().st_size
    need = 0
    for series in tif.series:
        for level in series.levels:
            for page in level.pages:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
                if ends:
                    need = max(need, max(ends))
    if need > size:
        raise InputError(f"{str(path)!r} is truncated: {size:,} of its {need:,} bytes are there (a copy cut short?).")


def _main_series(tif, path: Path):
    """The series holding the scan: the largest one with Y and X axes (an SVS also holds a label and a
    macro photo; an NDPI a map)."""
    candidates = [s for s in tif.series if "Y" in s.axes and "X" in s.axes]
    if not candidates:
        raise InputError(f"{str(path)!r} holds no 2-D image (its series have axes {[s.axes for s in tif.series]}).")
    return max(candidates, key=lambda s: s.shape[s.axes.index("Y")] * s.shape[s.axes.index("X")])


def _order_axes(array, axes: str, path: Path):
    """A level as (Y, X) or (Y, X, C): samples / channels last, axes of length one dropped."""
    import dask.array as da

    keep = [i for i, a in enumerate(axes) if a in "YXSC" or array.shape[i] > 1]
    extra = [axes[i] for i in keep if axes[i] not in "YXSC"]
    colour = [i for i in keep if axes[i] in "SC"]
    if extra or len(colour) > 1:
        raise InputError(
            f"{str(path)!r} is a {axes} stack of shape {tuple(array.shape)}: the full-resolution image must be one "
            "2-D RGB (or single-channel) image."
        )
    index = tuple(slice(None) if i in keep else 0 for i in range(len(axes)))
    array = array[index]
    names = [axes[i] for i in keep]
    order = [names.index("Y"), names.index("X")] + [names.index(a) for a in names if a in "SC"]
    if order != list(range(len(order))):
        array = da.transpose(array, order)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise InputError(
            f"{str(path)!r} has {array.shape[-1]} channels: the full-resolution image must be RGB(A) (an H&E "
            "scan) or a single channel (a nuclear stain)."
        )
    return array


def _um_per_px_of(tif) -> float | None:
    """Pixel size (µm) of the finest level, from OME, SVS or TIFF resolution metadata; None when absent."""
    value = None
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        scale = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm")
        if m and scale:
            value = float(m.group(1)) * scale
    if value is None and tif.is_svs:
        m = re.search(r"MPP\s*=\s*([0-9.]+)", tif.pages.first.description or "")
        if m:
            value = float(m.group(1))
    if value is None:
        page = tif.pages.first
        res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if res is not None and unit is not None and int(unit.value) in (2, 3):
            num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
            per_unit = float(num) / float(den) if den else 0.0
            if per_unit > 0:
                value = (25400.0 if int(unit.value) == 2 else 1e4) / per_unit
    lo, hi = _PLAUSIBLE_UM_PER_PX
    return value if value is not None and lo <= value <= hi else None


def _virtual_levels(level0) -> list:
    """Subsampled views of a single-level image (factors 2, 4, ...) down to ``_COARSEST`` px a side."""
    levels, f = [], 2
    while max(level0.shape[:2]) / f > _COARSEST / 2:
        levels.append(level0[::f, ::f])
        f *= 2
    return levels


def _decode_one_tile(level, path: Path) -> None:
    """Read one pixel (one tile) of ``level``: a compression tifffile cannot decode says which package it needs."""
    try:
        np.asarray(level[:1, :1])
    except Exception as err:
        if "imagecodecs" in str(err):
            kind = re.search(r"COMPRESSION\.(\w+)", str(err))
            raise InputError(
                f"{str(path)!r} has {kind.group(1) if kind else 'compressed'} tiles, which need the optional package "
                "imagecodecs to be read: pip install imagecodecs."
            ) from err
        raise


def open_fullres_image(path: str | os.PathLike) -> Pyramid:
    """Open a full-resolution histology TIFF lazily, as a :class:`Pyramid` of dask arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A tiled TIFF, OME-TIFF, BigTIFF, SVS or NDPI file: RGB(A) (H&E) or single-channel (a nuclear stain),
        pyramidal or not.

    Returns
    -------
    Pyramid
        Its levels finest first, (H_k, W_k, 3) (or (H_k, W_k)) dask arrays whose chunks are the file's
        tiles; ``um_per_px`` from the file's metadata when it has one. A single-level image larger than
        ``VIRTUAL_LEVELS_ABOVE`` px gets subsampled views as coarser levels (``virtual`` is then True; they
        read the finest level, so zooming out is slow: give napari a pyramidal file for speed).

    Raises
    ------
    InputError
        When ``path`` does not exist, is not a TIFF (the message says what it is), is cut short, is not one
        2-D RGB or single-channel image, or its pixels cannot be decoded (e.g. JPEG tiles without the
        optional ``imagecodecs`` package). Each says so in one line naming the file.
    """
    import dask.array as da
    import tifffile
    import zarr

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Full-resolution image {str(path)!r} does not exist.")
    _check_tiff_file(path)
    what = "TIFF image (the full-resolution scan)"
    with reading(path, what):
        tif = tifffile.TiffFile(path)
    try:
        with reading(path, what):
            _check_complete(tif, path)
            series = _main_series(tif, path)
            group = zarr.open_group(series.aszarr(multiscales=True), mode="r")
            keys = sorted(group.array_keys(), key=int)
            levels = [_order_axes(da.from_zarr(group[k]), series.axes, path) for k in keys]
            levels = [lv for i, lv in enumerate(levels) if i == 0 or lv.shape[0] < levels[i - 1].shape[0]]
            _decode_one_tile(levels[-1], path)  # an unsupported compression fails here, not in napari
        pyramid = Pyramid(levels, source=path, um_per_px=_um_per_px_of(tif), handle=tif)
    except BaseException:
        tif.close()
        raise
    if len(pyramid) == 1 and max(pyramid.shape[:2]) > VIRTUAL_LEVELS_ABOVE:
        pyramid.extend(_virtual_levels(pyramid[0]))
        pyramid.virtual = True
        logger.warning(
            "%s has no pyramid (one level of %d x %d px): zoomed-out views read the whole image and are slow; "
            "a pyramidal (OME-)TIFF opens at once",
            path.name, pyramid.shape[1], pyramid.shape[0],
        )  # fmt: skip
    logger.info("Opened full-resolution image %s: %r (%s µm/px)", path, pyramid, pyramid.um_per_px)
    return pyramid
