"""The synthetic H&E image: tissue mask, stain fields and one drawn nucleus per cell.

The image is drawn at ``um_per_px`` µm per pixel (2 µm, the ``hires`` scale, by default). Lengths of the
stain texture and of the optical blur are fixed in µm: written in pixels at 2 µm/px and scaled by
``2 / um_per_px`` at other pixel sizes, so the default image is unchanged and a finer one shows the same
tissue with more pixels per nucleus.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._constants import _HIRES_UM_PER_PX, _IMAGE_MARGIN_UM, _NUCLEUS_SPACING, _TISSUE_DILATION_UM
from ._layout import _Composition, _Section
from ._nuclei import _nuclei


def _upsample_linear(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``coarse`` (h, w), sampled every ``step`` pixels, to ``shape`` (H, W)."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = np.arange(n) / step
        i0 = np.minimum(pos.astype(np.int64), coarse.shape[axis] - 2)
        frac = (pos - i0).astype(coarse.dtype)
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        frac = frac[:, None] if axis == 0 else frac[None, :]
        out = lo + (hi - lo) * frac
    return out


def _tissue_mask(
    shape: tuple[int, int], sections: list[_Section], boxes: list[np.ndarray], um_per_px: float = _HIRES_UM_PER_PX
) -> np.ndarray:
    """Boolean tissue mask (H, W) on the image's pixel grid (``um_per_px`` µm per pixel).

    A section's tissue is its outline (the region its spots were selected from) dilated by
    ``_TISSUE_DILATION_UM``, so every spot circle and its nuclei lie on tissue.
    """
    from scipy import ndimage

    step = 4  # the outline's distance field is smooth: evaluate it on a coarse grid and interpolate
    mask = np.zeros(shape, dtype=bool)
    dil_px = _TISSUE_DILATION_UM / um_per_px
    for section, box in zip(sections, boxes, strict=True):
        c0, r0 = max(int(np.floor(box[0] / um_per_px)), 0), max(int(np.floor(box[1] / um_per_px)), 0)
        c1, r1 = (
            min(int(np.ceil(box[2] / um_per_px)) + 1, shape[1]),
            min(int(np.ceil(box[3] / um_per_px)) + 1, shape[0]),
        )
        rows = r0 + step * np.arange((r1 - r0 - 1) // step + 2)
        cols = c0 + step * np.arange((c1 - c0 - 1) // step + 2)
        xy = np.stack(np.broadcast_arrays(cols[None, :] * um_per_px, rows[:, None] * um_per_px), axis=-1)
        dist = _upsample_linear(section.shape_distance(xy).astype(np.float32), step, (r1 - r0, c1 - c0))
        mask[r0:r1, c0:c1] |= ndimage.distance_transform_edt(dist > section.scale) <= dil_px
    return mask


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, step: int) -> np.ndarray:
    """Standardised smooth noise (H, W) float32: Gaussian-filtered on a grid ``step`` times coarser, upsampled."""
    from scipy import ndimage

    small = (shape[0] // step + 2, shape[1] // step + 2)
    noise = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / step)
    noise = (noise - noise.mean()) / (noise.std() + 1e-12)
    if step > 1:
        noise = ndimage.zoom(noise, step, order=1)
    return noise[: shape[0], : shape[1]]


def _render_he(
    rng: np.random.Generator, mask: np.ndarray, nuclei: dict[str, np.ndarray], um_per_px: float = _HIRES_UM_PER_PX
) -> np.ndarray:
    """Render a synthetic H&E image (H, W, 3) uint8 from a tissue mask (H, W) and nuclei (image pixel units).

    Colour follows Beer-Lambert: optical density = hematoxylin * h_vec + eosin * e_vec + glass. Overlapping
    nuclei are max-composited (their union is one evenly stained shape, the hardest case to split).
    """
    from scipy import ndimage

    f32 = np.float32
    h, w = mask.shape
    s = _HIRES_UM_PER_PX / float(um_per_px)  # pixel lengths below are written at 2 µm/px

    def step(n: int) -> int:
        return max(1, int(round(n * s)))

    soft = ndimage.gaussian_filter(mask.astype(f32), 1.2 * s)
    coarse, fine = _smooth_noise(rng, mask.shape, 24.0 * s, step(8)), _smooth_noise(rng, mask.shape, 3.0 * s, step(1))
    eosin = soft * (f32(0.55) + f32(0.07) * coarse + f32(0.05) * fine)
    hema = soft * (f32(0.10) + f32(0.03) * _smooth_noise(rng, mask.shape, 6.0 * s, step(2)))

    # nuclei: soft-edged filled ellipses (about one pixel of anti-aliasing), max-composited
    rows, cols = nuclei["row"].astype(f32), nuclei["col"].astype(f32)
    a_px, b_px = (nuclei["major_px"] / 2).astype(f32), (nuclei["minor_px"] / 2).astype(f32)
    if len(rows):
        half = int(np.ceil(a_px.max() + 0.5))
        off = np.arange(-half, half + 1)
        r0, c0 = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
        rr = r0[:, None, None] + off[None, :, None]  # (n, k, 1)
        cc = c0[:, None, None] + off[None, None, :]  # (n, 1, k)
        dr, dc = (rr - rows[:, None, None]).astype(f32), (cc - cols[:, None, None]).astype(f32)
        angle = nuclei["angle"].astype(f32)[:, None, None]
        cos, sin = np.cos(angle), np.sin(angle)
        q = np.sqrt(
            ((dc * cos + dr * sin) / a_px[:, None, None]) ** 2 + ((dr * cos - dc * sin) / b_px[:, None, None]) ** 2
        )
        val = np.clip(f32(0.5) + (f32(1.0) - q) * b_px[:, None, None], 0.0, 1.0)
        val *= nuclei["dark"].astype(f32)[:, None, None] * rng.uniform(0.8, 1.1, val.shape).astype(f32)  # chromatin
        rr, cc = np.broadcast_arrays(rr, cc)
        ok = (val > 0) & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        nuc = np.zeros(h * w, dtype=f32)
        np.maximum.at(nuc, (rr * w + cc)[ok], val[ok])
        hema += nuc.reshape(h, w)

    hema = ndimage.gaussian_filter(hema, 0.6 * s)
    eosin = ndimage.gaussian_filter(eosin, 0.8 * s)
    h_vec = np.array([0.65, 0.70, 0.29], dtype=f32)
    e_vec = np.array([0.10, 0.75, 0.35], dtype=f32)
    od = hema[..., None] * h_vec + eosin[..., None] * e_vec + f32(0.03)
    rgb = f32(255.0) * np.exp(-od)
    rgb += f32(2.5) * rng.standard_normal(rgb.shape, dtype=f32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _histology(
    rng: np.random.Generator,
    comp: _Composition,
    spot_names: np.ndarray,
    type_names: list[str],
    spacing: float = _NUCLEUS_SPACING,
    um_per_px: float = _HIRES_UM_PER_PX,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Draw the nuclei of all cells and render the H&E image around the sections of ``comp``.

    ``spacing`` is the minimum centre distance of two nuclei in units of their mean major diameter (see
    :func:`._nuclei._nuclei`), ``um_per_px`` the size of one image pixel. Returns the image (H, W, 3) uint8,
    the nuclei table (``row``, ``col`` in image pixels, ``spot``, ``cell_type``, ``major_um``, ``minor_um``,
    ``angle``) and the tissue mask (H, W).
    """
    um_per_px = float(um_per_px)
    extent = np.max(np.stack(comp.boxes)[:, 2:], axis=0) + _IMAGE_MARGIN_UM
    shape = (int(np.ceil(extent[1] / um_per_px)), int(np.ceil(extent[0] / um_per_px)))
    mask = _tissue_mask(shape, comp.sections, comp.boxes, um_per_px)
    nuc = _nuclei(rng, comp, spot_names, mask, spacing, um_per_px)
    render = {
        "row": nuc["y_um"] / um_per_px,
        "col": nuc["x_um"] / um_per_px,
        "major_px": nuc["major_um"] / um_per_px,
        "minor_px": nuc["minor_um"] / um_per_px,
        "angle": nuc["angle"],
        "dark": nuc["dark"],
    }
    he = _render_he(rng, mask, render, um_per_px)
    nuclei = pd.DataFrame(
        {
            "row": render["row"],
            "col": render["col"],
            "spot": nuc["spot"],
            "cell_type": pd.Categorical([type_names[f] for f in nuc["type"]], categories=type_names),
            "major_um": nuc["major_um"],
            "minor_um": nuc["minor_um"],
            "angle": nuc["angle"],
        }
    )
    return he, nuclei, mask
