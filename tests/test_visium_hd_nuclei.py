"""Nuclei per Visium HD bin: bins are counted as the squares they are (not the circle inscribed in them, which
loses the corners), each nucleus in the one bin holding its centre; the full-resolution image of an HD run is
found as for standard Visium and opens next to its bins; the Cells tab counts per square bin.

Runs are written by :func:`napari_cell2location.datasets.write_visium_hd`, whose cells sit in the finest bins:
the nuclei centred in a bin of any size are its cells, exactly.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from napari_cell2location.datasets import write_visium_hd
from napari_cell2location.io import (
    find_fullres_image,
    fullres_image_for,
    read_visium_hd,
)
from napari_cell2location.nuclei import (
    count_nuclei_per_spot,
    detect_in_spots,
    estimate_n_cells_per_location,
    outlier_fences,
    overlap_scaling,
    spot_regions,
    spot_shape,
)
from napari_cell2location.nuclei._detect import _tiles

SCAN_MPP = 0.25  # µm per full-resolution pixel of the run with a scan (real HD slides: ~0.27)
SCAN_SIDE = 2048  # its scan: (32 µm margin x 2 + 224 bins of 2 µm) / 0.25 µm


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory):
    """A small HD run without a scan (hires PNG at 1 µm/px, 0.5 µm full-resolution pixels); read only."""
    return write_visium_hd(tmp_path_factory.mktemp("hdn") / "run", n_bins_side=64, seed=3)


def _paint(shape, centres, radius, seed=0) -> np.ndarray:
    """(H, W, 3) uint8 H&E-like image: pink tissue with a purple disc (anti-aliased edge) at each centre (row, col)."""
    rng = np.random.default_rng(seed)
    image = np.empty((*shape, 3), np.float32)
    image[:] = (232, 170, 200)
    image *= (1.0 + 0.04 * rng.standard_normal(shape, dtype=np.float32))[..., None]
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    base = np.rint(centres).astype(np.int64)
    reach = int(np.ceil(radius)) + 1
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            rr, cc = base[:, 0] + dr, base[:, 1] + dc
            weight = np.clip(radius + 0.5 - np.hypot(rr - centres[:, 0], cc - centres[:, 1]), 0.0, 1.0)
            ok = (weight > 0) & (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
            w = weight[ok, None].astype(np.float32)
            image[rr[ok], cc[ok]] = image[rr[ok], cc[ok]] * (1 - w) + np.float32([80, 50, 130]) * w
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_pyramid(path, image, um_per_px) -> None:
    """A tiled, pyramidal OME-TIFF of ``image`` (levels halved down to 512 px), as a microscope writes one."""
    import tifffile

    levels = [image]
    while max(levels[-1].shape[:2]) > 512:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    per_cm = 1e4 / um_per_px
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, level in enumerate(levels):
            extra = (
                {"subifds": len(levels) - 1, "metadata": {"axes": "YXS", "PhysicalSizeX": um_per_px,
                                                          "PhysicalSizeY": um_per_px}}
                if k == 0 else {"subfiletype": 1, "metadata": None}
            )  # fmt: skip
            tif.write(
                level, tile=(256, 256), photometric="rgb", compression="zlib",
                resolution=(per_cm / 2**k, per_cm / 2**k), resolutionunit="CENTIMETER", **extra,
            )  # fmt: skip


@pytest.fixture(scope="module")
def hd_scan(tmp_path_factory):
    """An HD run at 0.25 µm/px with its 2048² full-resolution scan (a nucleus drawn at each cell) kept apart,
    in ``images/``, as Space Ranger's --image usually is. Read only: tests move copies around."""
    root = tmp_path_factory.mktemp("hdscan")
    hd = write_visium_hd(root / "run", n_bins_side=224, microns_per_pixel=SCAN_MPP, seed=2)
    cells_rc = hd.cells[["y_um", "x_um"]].to_numpy() / SCAN_MPP
    (root / "images").mkdir()
    scan = root / "images" / "scan.ome.tif"
    _write_pyramid(scan, _paint((SCAN_SIDE, SCAN_SIDE), cells_rc, 3.0 / SCAN_MPP, seed=1), SCAN_MPP)
    return hd, scan, cells_rc


@pytest.fixture
def hd_scan_copy(hd_scan, tmp_path):
    """A copy of the run folder (without the scan) and the scan, to place where a test wants it."""
    hd, scan, _ = hd_scan
    run = tmp_path / "run"
    shutil.copytree(hd.outs.parent, run)
    return run, scan


def _bins(adata):
    """Bin centres (row, col) and half sides, in full-resolution pixels."""
    side = adata.uns["spatial"]["run"]["scalefactors"]["bin_side_fullres"]
    return adata.obsm["spatial"][:, ::-1], 0.5 * side


# --------------------------------------------------------------------------- counting in squares
def test_square_bins_count_every_nucleus_centred_in_them_once():
    """A grid of 12 x 12 bins of 32 px: counts are the nuclei whose centre lies in each square; nuclei on a
    shared edge or corner count in one bin only; the inscribed circle would lose the corners."""
    rng = np.random.default_rng(0)
    side, n, origin = 32.0, 12, np.array([100.0, 60.0])
    rows, cols = np.divmod(np.arange(n * n), n)
    centres = origin + (np.stack([rows, cols], 1) + 0.5) * side
    inside = origin + rng.uniform(0, n * side, (3000, 2))
    outside = np.r_[origin - rng.uniform(1, 50, (200, 2)), origin + n * side + rng.uniform(1, 50, (200, 2))]
    edges = origin + side * np.r_[[[3, 4], [3.5, 4], [5, 5.5], [0, 0], [n, n], [n, 2.5], [7, 0]]]
    nuclei = np.r_[inside, outside, edges]

    counts = count_nuclei_per_spot(nuclei, centres, side / 2, shape="square")
    cell = np.floor((inside - origin) / side).astype(int)
    expected = np.bincount(cell[:, 0] * n + cell[:, 1], minlength=n * n)
    assert counts.sum() == len(inside) + len(edges)  # each nucleus in the squares counted once, the others not
    on_edges = count_nuclei_per_spot(edges, centres, side / 2, shape="square")
    np.testing.assert_array_equal(counts - on_edges, expected)
    assert on_edges.sum() == len(edges) and on_edges.max() <= 2  # a shared corner goes to one bin
    # a table as detect_nuclei returns it; different sizes per bin
    table = pd.DataFrame({"row": inside[:, 0], "col": inside[:, 1]})
    np.testing.assert_array_equal(count_nuclei_per_spot(table, centres, np.full(n * n, side / 2), shape="square"),
                                  expected)  # fmt: skip
    small = np.where(np.arange(n * n) % 2, side / 2, side / 4)  # every other bin half as wide
    in_small = count_nuclei_per_spot(inside, centres, small, shape="square")
    held = (np.abs(inside[:, None] - centres[None]).max(-1) <= small[None]).sum(0)
    np.testing.assert_array_equal(in_small, held)

    # the circle of the bin's width holds pi / 4 of the square: corners lost
    circle = count_nuclei_per_spot(inside, centres, side / 2)
    assert (circle <= expected).all() and circle.sum() < 0.85 * len(inside)
    corner = centres[:1] + [[0.45 * side, 0.45 * side]]
    assert count_nuclei_per_spot(corner, centres, side / 2)[0] == 0
    assert count_nuclei_per_spot(corner, centres, side / 2, shape="square")[0] == 1
    with pytest.raises(ValueError, match="shape must be one of"):
        count_nuclei_per_spot(inside, centres, side / 2, shape="hexagon")


@pytest.mark.parametrize("size", [2, 8, 16])
def test_cells_of_a_synthetic_hd_run_are_counted_in_their_bins(hd_run, size):
    """Every cell of the run, at every bin size: the count per bin is the truth, the sum is every cell."""
    adata = read_visium_hd(hd_run.outs, bin_size=size)
    assert spot_shape(adata) == "square" and spot_shape(adata.uns["spatial"]["run"]["scalefactors"]) == "square"
    centres, half = _bins(adata)
    nuclei = hd_run.cells[["y_um", "x_um"]].to_numpy() / hd_run.microns_per_pixel
    counts = count_nuclei_per_spot(nuclei, centres, half, shape="square")
    truth = hd_run.cell_abundance[size].sum(axis=1).to_numpy()
    np.testing.assert_array_equal(counts, truth)
    assert counts.sum() == len(hd_run.cells)
    assert count_nuclei_per_spot(nuclei, centres, half).sum() < len(hd_run.cells)  # the circle rule misses some


def test_standard_visium_spots_stay_circles():
    from napari_cell2location.datasets import synthetic_visium

    spots = synthetic_visium(n_spots=20, n_genes=10, n_cell_types=2, n_batches=1, image=False).adata
    assert spot_shape(spots) == "circle" and spot_shape({"spot_diameter_fullres": 110.0}) == "circle"
    assert spot_shape(None) == "circle"


def test_estimate_from_small_bins_keeps_their_mean():
    """8 µm bins hold 0-3 nuclei, 2 µm bins mostly 0: the estimate is their mean (quartiles of 0 or 1 do not
    clip every other count), and nothing is divided by a circle's area."""
    rng = np.random.default_rng(1)
    for mean in (0.04, 0.6, 2.0):
        counts = rng.poisson(mean, 20_000)
        est = estimate_n_cells_per_location(counts, spot_shape="square")
        assert est.value == pytest.approx(counts.mean())
        assert est.scaling == 1.0 and est.n_spots == len(counts)
        # the per-bin prior's floor: 1 cell, or the tissue's mean where that is lower (2 µm bins: ~0.04)
        np.testing.assert_allclose(est.per_spot, np.maximum(counts, min(1.0, est.value)))
        assert est.per_spot.min() == pytest.approx(min(1.0, counts.mean()))
    assert outlier_fences(np.zeros(100)) == pytest.approx((0.0, (3 * 1.349 * 0.5) ** 2))
    assert outlier_fences(np.r_[np.zeros(80), 40.0])[1] < 40  # a fold far out is still clipped
    # cells reaching into a square from around it: (s² + 4 s c + pi c²) / s²
    assert overlap_scaling(5.0, 8.0, "square") == pytest.approx((64 + 160 + np.pi * 25) / 64)
    assert overlap_scaling(0.0, 2.0, "square") == 1.0
    assert overlap_scaling(5.0) == pytest.approx((32.5 / 27.5) ** 2)  # round spots as before
    est = estimate_n_cells_per_location([0, 1, 2, 1], spot_shape="square", cell_radius_um=5.0, spot_diameter_um=8.0)
    assert est.value == pytest.approx(overlap_scaling(5.0, 8.0, "square"))
    with pytest.raises(ValueError, match="bin side"):
        estimate_n_cells_per_location([0, 1, 2], spot_shape="square", cell_radius_um=5.0)


# --------------------------------------------------------------------------- detection under the squares
def _add_separated(rng, taken, box, n, min_dist, keep) -> np.ndarray:
    """``taken`` (m, 2) and up to ``n`` random centres in ``box`` (r0, r1, c0, c1), all ``min_dist`` apart,
    where ``keep(point)`` says yes."""
    out = np.asarray(taken, dtype=np.float64).reshape(-1, 2)
    added = 0
    for p in rng.uniform([box[0], box[2]], [box[1], box[3]], (20 * n, 2)):
        if keep(p) and (not len(out) or np.hypot(*(out - p).T).min() >= min_dist):
            out = np.vstack([out, p])
            added += 1
            if added == n:
                break
    return out


def test_detect_in_square_bins_reads_the_tiles_under_them_and_counts_exactly():
    """Nuclei at known centres, one in a corner of every bin (outside its inscribed circle): detected under
    the 16 µm bins only (the tiles they meet), each counted in its bin, exactly."""
    rng = np.random.default_rng(4)
    px, side, n, origin, chunk = 0.5, 32.0, 8, np.array([300.0, 700.0]), 256  # 16 µm bins at 0.5 µm/px
    rows, cols = np.divmod(np.arange(n * n), n)
    centres = origin + (np.stack([rows, cols], 1) + 0.5) * side
    corners = centres + [12.0, 12.0]  # 17 px from the centre: outside the 16 px inscribed circle

    def away_from_edges(p):  # a detected centre may move a pixel: keep true ones 3 px from bin edges
        offset = np.mod(p - origin, side)
        return bool(np.all((offset > 3) & (offset < side - 3)))

    nuclei = _add_separated(rng, corners, (0, 1536, 0, 1536), 400, 18.0, away_from_edges)
    image = _paint((1536, 1536), nuclei, 5.0, seed=2)  # nuclei 5 µm across
    truth = count_nuclei_per_spot(nuclei, centres, side / 2, shape="square")
    assert truth.min() >= 1 and truth.sum() < len(nuclei)  # nuclei outside the bins too

    found = detect_in_spots(
        image, spots=centres, spot_radius=side / 2, spot_shape="square", spot_size_um=16.0,
        nucleus_diameter_um=5.0, chunk_size=chunk,
    )  # fmt: skip
    assert found.table.attrs["pixel_size_um"] == pytest.approx(px)  # from the 16 µm bins
    np.testing.assert_array_equal(found.counts, truth)
    margin = 5.0 / px
    boxes = spot_regions(centres, side / 2, image.shape, margin=margin)
    np.testing.assert_allclose(boxes[0], [*(centres[0, 0] + [-16 - margin, 16 + margin]),
                                          *(centres[0, 1] + [-16 - margin, 16 + margin])])  # fmt: skip
    assert found.n_tiles == len(_tiles(image.shape[:2], chunk, boxes)) == 4 < found.n_tiles_total == 36
    circle = count_nuclei_per_spot(found.world, centres, side / 2)
    assert circle.sum() <= truth.sum() - n * n  # the circle rule would lose every corner nucleus
    with pytest.raises(ValueError, match="cannot tell the pixel size"):
        detect_in_spots(image, spots=centres, spot_radius=side / 2, spot_shape="square")  # bins: no 55 µm rule


def test_tiles_under_many_boxes_are_the_tiles_any_box_meets():
    """The tiles met by 10^5-10^6 bin boxes are found in linear time, the same as box by box."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 2500, 2))
        chunk = int(rng.choice([64, 100, 256, 1024]))
        start = rng.uniform(-200, 2700, (int(rng.integers(0, 12)), 2))
        stop = start + rng.uniform(-10, 600, start.shape)
        boxes = np.stack([start[:, 0], stop[:, 0], start[:, 1], stop[:, 1]], 1)
        if rng.random() < 0.3:
            boxes = np.round(boxes / chunk) * chunk  # boxes on tile edges
        every = [(r, min(r + chunk, h), c, min(c + chunk, w)) for r in range(0, h, chunk) for c in range(0, w, chunk)]
        met = [t for t in every if any(t[0] < b[1] and b[0] < t[1] and t[2] < b[3] and b[2] < t[3] for b in boxes)]
        assert _tiles((h, w), chunk, boxes) == met


# --------------------------------------------------------------------------- the full-resolution image
def test_fullres_image_of_an_hd_run_is_found_wherever_space_ranger_leaves_it(hd_scan_copy, tmp_path, caplog):
    run, scan = hd_scan_copy
    outs = run / "outs"
    points = (run, outs, outs / "binned_outputs", outs / "binned_outputs" / "square_008um")
    assert all(find_fullres_image(p) == [] for p in points)  # nothing recorded, no TIFF
    assert fullres_image_for(outs) is None

    # 1. recorded by the run: --image in _cmdline (relative to where Space Ranger was started)
    (run / "_cmdline").write_text(f"spaceranger count --id=run --image={os.path.relpath(scan, run.parent)} "
                                  "--cytaimage=cyta.tif --slide=H1-000 --area=A1\n")  # fmt: skip
    for p in points:
        assert [f.resolve() for f in find_fullres_image(p)] == [scan.resolve()], p
    pyramid = fullres_image_for(outs / "binned_outputs" / "square_016um")  # reads the bins itself
    assert pyramid.shape[:2] == (SCAN_SIDE, SCAN_SIDE) and pyramid.um_per_px == pytest.approx(SCAN_MPP)
    pyramid.close()
    (run / "_cmdline").unlink()

    # 2. a TIFF beside the outputs: outs/spatial, outs, the run folder
    for folder in (outs / "spatial", outs, run):
        placed = folder / "tissue.ome.tif"
        shutil.copy(scan, placed)
        assert find_fullres_image(outs / "binned_outputs" / "square_002um") == [placed]
        pyramid = fullres_image_for(run, adata=read_visium_hd(run, bin_size=16))
        assert pyramid.source == placed
        pyramid.close()
        placed.unlink()

    # 3. a TIFF that is not this section's frame is skipped with a warning; the right one is used
    _write_pyramid(run / "a_small.tif", np.full((600, 600, 3), 200, np.uint8), SCAN_MPP)
    shutil.copy(scan, run / "b_scan.tif")
    with caplog.at_level(logging.WARNING, logger="napari_cell2location"):
        pyramid = fullres_image_for(outs)
    assert pyramid.source == run / "b_scan.tif"
    pyramid.close()
    assert "skipped a_small.tif" in caplog.text


def test_reader_opens_an_hd_run_with_its_fullres_image(hd_scan_copy):
    pytest.importorskip("napari")
    from napari_cell2location._reader import layer_data_from_path, read_paths

    run, scan = hd_scan_copy
    (run / "_cmdline").write_text(f"spaceranger count --id=run --image {scan}\n")
    (image, ikw, ikind), (yx, pkw, pkind) = layer_data_from_path(run)
    assert ikind == "image" and ikw["multiscale"] and ikw["name"] == "run 8 µm bins H&E (full resolution)"
    assert image.shape[:2] == (SCAN_SIDE, SCAN_SIDE) and ikw["metadata"]["pixel_size_um"] == pytest.approx(SCAN_MPP)
    np.testing.assert_allclose(ikw["affine"], np.eye(3))  # world = full-resolution pixels, as the bins
    assert pkind == "points" and pkw["symbol"] == "square" and pkw["size"] == 8 / SCAN_MPP
    image.close()
    # opened together with a TIFF, the TIFF is its image (here a bin folder of 16 µm)
    (run / "_cmdline").unlink()
    other = run.parent / "given.tif"
    shutil.copy(scan, other)
    (image, ikw, _), (_, pkw, _) = read_paths([str(run / "outs" / "binned_outputs" / "square_016um"), str(other)])
    assert ikw["metadata"]["source"] == str(other) and pkw["size"] == 16 / SCAN_MPP
    image.close()


# --------------------------------------------------------------------------- the Cells tab
def _gui():
    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("images need OpenGL (use xvfb-run)")


def test_cells_tab_counts_per_square_bin(make_napari_viewer, hd_run):
    """HD bins over the hires PNG: µm per pixel from the 8 µm bins, nuclei (clicked at the cells) counted per
    bin as squares, exactly the cells of each bin; the manual protocol counts the selected bins."""
    _gui()
    from napari_cell2location._qt._cells_widget import COUNT_FEATURE, SCOPE_SELECTED, CellsPerSpotWidget

    viewer = make_napari_viewer()
    viewer.open(str(hd_run.outs.parent), plugin="napari-cell2location")
    bins = viewer.layers["run 8 µm bins"]
    w = CellsPerSpotWidget(viewer)
    assert w.spots.value is bins and w.image.value is not None
    assert w.um_per_world() == pytest.approx(hd_run.microns_per_pixel)  # 8 µm / 16 px, not 55 µm / 16 px
    assert w.pixel_size_um() == pytest.approx(1.0)  # the hires PNG: 1 µm/px
    assert "from the 8 µm bin size" in w.pixel_note.value

    layer = w.new_nuclei_layer()
    layer.add(hd_run.cells[["y_um", "x_um"]].to_numpy() / hd_run.microns_per_pixel)
    est = w.count()
    truth = hd_run.cell_abundance[8].sum(axis=1).to_numpy()
    np.testing.assert_array_equal(w.counts, truth)
    np.testing.assert_array_equal(bins.features[COUNT_FEATURE].to_numpy(), truth)
    assert np.nansum(w.counts) == len(hd_run.cells)  # each nucleus in one bin
    assert est.value == pytest.approx(truth.mean()) and truth.max() <= 6
    assert "in-tissue bins" in w.summary.value and w.plot.axes[0].get_xlabel() == "nuclei per bin"
    floor = min(1.0, est.value)  # empty bins: the tissue's mean where that is under one cell
    assert w.use_per_spot() is not None and np.allclose(w.state.n_cells, np.maximum(truth, floor)) and floor < 1

    w.scope.value = SCOPE_SELECTED
    chosen = [0, 5, 17, 40, 41]
    bins.selected_data = set(chosen)
    w.count()
    np.testing.assert_array_equal(w.counts[chosen], truth[chosen])
    assert np.isnan(np.delete(w.counts, chosen)).all()


@pytest.mark.slow
def test_cells_tab_detects_under_the_bins_of_an_hd_scan(make_napari_viewer, qtbot, hd_scan_copy, hd_scan):
    """An HD run opened with its scan: detection on the scan under the 8 µm bins, counted per square bin."""
    _gui()
    from napari_cell2location._qt._cells_widget import AREA_SPOTS, CellsPerSpotWidget

    run, scan = hd_scan_copy
    hd, _, _ = hd_scan
    (run / "_cmdline").write_text(f"spaceranger count --id=run --image={scan}\n")
    viewer = make_napari_viewer()
    viewer.open(str(run), plugin="napari-cell2location")
    w = CellsPerSpotWidget(viewer)
    assert w.image.value.multiscale and w.area.value == AREA_SPOTS
    assert w.pixel_size_um() == pytest.approx(SCAN_MPP)
    w.nucleus_diameter.value = 6.0
    w.chunk_size = 512
    assert w.detect() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert "bins" in w.summary.value, w.status.value
    truth = hd.cell_abundance[8].sum(axis=1).to_numpy()
    assert np.corrcoef(w.counts, truth)[0, 1] > 0.75  # overlapping nuclei merge: not exact
    assert 0.7 * truth.sum() < np.nansum(w.counts) <= truth.sum()
