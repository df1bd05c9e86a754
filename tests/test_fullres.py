"""The full-resolution image (issue 12, part 1): a synthetic 20,480² pyramidal TIFF written tile by tile next to
a Space Ranger folder, found and opened lazily by io and napari's reader as a multiscale layer in the spots'
world coordinates, and nuclei detected on its finest level under some spots only, with bounded memory."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cell2location.datasets._fullres import write_fullres_visium
from napari_cell2location.io import (
    InputError,
    Pyramid,
    find_fullres_image,
    frame_mismatch,
    fullres_image_for,
    open_fullres_image,
    place_on_sections,
    read_spaceranger,
)
from napari_cell2location.nuclei._fullres import detect_in_spots, spot_regions

pytestmark = pytest.mark.slow  # the module's scan takes 10-20 s to draw on two busy cores

SIZE = 20480


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 20,480² scan (six levels) of a 100-spot section, next to its Space Ranger outs/ folder."""
    return write_fullres_visium(tmp_path_factory.mktemp("fullres") / "run", size=SIZE, n_spots=100, seed=4)


def _copy_outs(scan, run):
    """A run folder holding a copy of the scan's outs/ and nothing else."""
    shutil.copytree(scan.outs, run / "outs")
    return run


# --------------------------------------------------------------------------- the synthetic scan
def test_scan_is_a_tiled_pyramid_with_the_nuclei_where_the_truth_says(scan):
    with tifffile.TiffFile(scan.image_path) as tif:
        series = tif.series[0]
        page = tif.pages.first
        assert tif.is_ome and series.is_pyramidal and len(series.levels) >= 5
        assert series.levels[0].shape == (SIZE, SIZE, 3) and page.is_tiled and page.tilewidth == 512
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert [lv.shape[:2] for lv in series.levels] == scan.level_shapes
    assert scan.image_path.stat().st_size < 0.05 * SIZE * SIZE * 3  # mostly glass: compressed to < 5 %
    pyramid = open_fullres_image(scan.image_path)
    level0 = pyramid[0]
    # nuclei are dark (hematoxylin) at their true centres; glass far from the section is one light colour
    sample = scan.nuclei.sample(300, random_state=0)
    rgb = np.stack([np.asarray(level0[int(round(r)), int(round(c))]) for r, c in sample[["row", "col"]].to_numpy()])
    assert np.mean(rgb[:, 0] < 170) > 0.95 and np.mean(rgb[:, 2] > rgb[:, 1]) > 0.95  # dark, blue over green
    corner = np.asarray(level0[:512, :512])
    assert corner.min() == corner.max() > 240
    # each spot centre lies on stained tissue, not on glass
    centres = np.rint(scan.spatial[:, ::-1]).astype(int)
    on = np.stack([np.asarray(level0[r, c]) for r, c in centres[:20]])
    assert (on[:, 1] < 225).all()
    # the hires PNG of outs/spatial is a level of the same pyramid, placed by its scale factor
    adata = read_spaceranger(scan.outs)
    hires = next(iter(adata.uns["spatial"].values()))["images"]["hires"]
    k = int(round(np.log2(1 / scan.scalefactors["tissue_hires_scalef"])))
    assert np.array_equal(hires, np.asarray(pyramid[k]))
    assert frame_mismatch(pyramid.shape, scan.scalefactors, {"hires": hires.shape}, adata.obsm["spatial"]) is None


# --------------------------------------------------------------------------- io: found, checked, lazy
def test_io_finds_the_recorded_or_nearby_image_and_opens_it_lazily(scan, tmp_path, caplog):
    assert find_fullres_image(scan.outs) == find_fullres_image(scan.run) == [scan.image_path]
    pyramid = fullres_image_for(scan.outs)
    assert isinstance(pyramid, Pyramid) and pyramid.source == scan.image_path
    assert pyramid.um_per_px == pytest.approx(0.5) and pyramid.rgb and not pyramid.virtual
    assert pyramid.downsample == [2.0**k for k in range(len(pyramid))]
    assert all(hasattr(level, "dask") for level in pyramid)  # lazy: dask arrays over the file's tiles
    assert pyramid[0].chunksize[:2] == (512, 512) and pyramid.nbytes == SIZE * SIZE * 3

    # a run folder without the image: nothing found; its _cmdline names it: found; its _invocation too
    run = _copy_outs(scan, tmp_path / "moved")
    assert find_fullres_image(run) == [] and fullres_image_for(run / "outs") is None
    (run / "_cmdline").write_text(f"spaceranger count --id=moved --image {scan.image_path} --slide=V1\n")
    assert fullres_image_for(run).source == scan.image_path
    (run / "_cmdline").unlink()
    images = tmp_path / "images"
    images.mkdir()
    (images / "scan.ome.tif").symlink_to(scan.image_path)
    (run / "_invocation").write_text('@include "sc_rna_counter_cs.mro"\ncall SPATIAL_RNA_COUNTER_CS(\n'
                                     '    tissue_image_paths = ["images/scan.ome.tif"],\n)\n')  # fmt: skip
    assert find_fullres_image(run) == [images / "scan.ome.tif"]

    # without a record: TIFFs in outs/ come before the run folder's; one of another size is skipped with a
    # warning (and refused when the user gives it)
    (run / "_invocation").unlink()
    other = run / "outs" / "aaa_other.tif"
    tifffile.imwrite(other, np.full((600, 800, 3), 200, np.uint8))
    (run / "scan.ome.tif").symlink_to(scan.image_path)
    assert find_fullres_image(run) == [other, run / "scan.ome.tif"]
    caplog.clear()
    assert fullres_image_for(run).source == run / "scan.ome.tif"
    assert "skipped aaa_other.tif" in caplog.text and "800 x 600 px" in caplog.text
    with pytest.raises(InputError, match=r"aaa_other.tif' is not the full-resolution image of .*800 x 600 px"):
        fullres_image_for(run, image=other)


def test_frame_mismatch_and_placement_rules():
    sf = {"tissue_hires_scalef": 0.1}
    assert frame_mismatch((20000, 30000), sf, {"hires": (2000, 3000, 3)}) is None
    assert "was made from a 30,000 x 20,000 px image" in frame_mismatch((10000, 15000), sf, {"hires": (2000, 3000)})
    # without a hires / lowres image the spots must lie inside it
    assert frame_mismatch((1000, 1000), spatial_xy=[[10.0, 20.0], [900.0, 990.0]]) is None
    assert "spots reach x = 1,500" in frame_mismatch((1000, 1000), spatial_xy=[[1500.0, 20.0]])
    # an image opened alone lands on the shown section whose world extent is its size (a shifted one here)
    shifted = np.array([[4.0, 0, 0], [0, 4.0, 5000.0], [0, 0, 1]])
    assert np.allclose(place_on_sections((4000, 6000, 3), [((500, 500), np.eye(3)), ((1000, 1500), shifted)]),
                       [[1, 0, 0], [0, 1, 5000.0], [0, 0, 1]])  # fmt: skip
    assert np.allclose(place_on_sections((4000, 6000), [((100, 100), shifted)]), np.eye(3))


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("garbage", "is not a TIFF image: this is binary data"),
        ("text", "is not a TIFF image: this is text starting with '<html>"),
        ("empty", "is not a TIFF image: this is empty (0 bytes)"),
        ("png", "is not a TIFF image: this is a PNG image"),
        ("truncated", "truncated"),
        ("stack", "is a ZYXS stack"),
        ("channels", "has 5 channels"),
        ("folder", "is a folder, not a full-resolution image"),
        ("jpeg", "has JPEG tiles, which need the optional package imagecodecs to be read: pip install imagecodecs"),
    ],
)
def test_broken_or_foreign_tiffs_are_one_clear_line(scan, tmp_path, how, says):
    from napari.utils.notifications import notification_manager

    from napari_cell2location._reader import NO_LAYERS, napari_get_reader, reader_function

    bad = tmp_path / f"bad_{how}.tif"
    if how == "garbage":
        bad.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif how == "text":
        bad.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "png":
        bad.write_bytes((scan.outs / "spatial" / "tissue_lowres_image.png").read_bytes())
    elif how == "truncated":
        data = scan.image_path.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif how == "stack":
        tifffile.imwrite(bad, np.zeros((2, 64, 64, 3), np.uint8), photometric="rgb", metadata={"axes": "ZYXS"})
    elif how == "channels":
        tifffile.imwrite(bad, np.zeros((64, 64, 5), np.uint8), planarconfig="contig", metadata={"axes": "YXS"})
    elif how == "jpeg":  # tiles marked JPEG (as an SVS), which tifffile decodes only with imagecodecs
        if importlib.util.find_spec("imagecodecs") is not None:
            pytest.skip("imagecodecs is installed: it would decode JPEG tiles")
        tifffile.imwrite(bad, np.full((4096, 4096, 3), 200, np.uint8), tile=(512, 512), compression="zlib")
        with tifffile.TiffFile(bad, mode="r+") as tif:
            tif.pages.first.tags["Compression"].overwrite(tifffile.COMPRESSION.JPEG)
    else:
        bad.mkdir()
    with pytest.raises(InputError) as err:
        open_fullres_image(bad)
    message = str(err.value)
    assert says in message and bad.name in message and "\n" not in message, message
    if how in ("stack", "channels"):  # small readable TIFFs are left to napari's own reader
        assert napari_get_reader(str(bad)) is None
    elif how != "folder":  # napari's reader claims a broken file and says why in one notification
        assert napari_get_reader(str(bad)) is not None
        n = len(notification_manager.records)
        assert reader_function(str(bad)) == NO_LAYERS
        shown = [str(r.message) for r in notification_manager.records[n:]]
        assert len(shown) == 1 and says in shown[0] and f"'{bad.name}'" in shown[0], shown


# --------------------------------------------------------------------------- napari's reader
def test_napari_reader_opens_a_multiscale_layer_on_the_spots(scan, tmp_path):
    from napari.layers import Layer

    from napari_cell2location._reader import napari_get_reader

    layers = napari_get_reader(str(scan.run))(str(scan.run))
    images = [t for t in layers if t[2] == "image"]
    (data, kwargs, _), (yx, _, _) = images[0], layers[-1]
    assert len(images) == 1 and isinstance(data, Pyramid) and kwargs["multiscale"]
    assert "full resolution" in kwargs["name"]
    layer = Layer.create(data, kwargs, "image")
    assert layer.multiscale and layer.rgb and len(layer.data) == len(scan.level_shapes)
    assert [tuple(s[:2]) for s in layer.level_shapes] == scan.level_shapes
    assert layer.metadata["pixel_size_um"] == pytest.approx(0.5)
    # world = full-resolution pixels: spots at obsm['spatial'] (x, y) -> (y, x); nuclei pixels at the same place
    assert np.allclose(yx, scan.spatial[:, ::-1])
    nuclei = scan.nuclei[scan.nuclei["spot"].notna()].sample(200, random_state=1)
    world = nuclei[["row", "col"]].to_numpy()
    pixels = np.rint([layer.world_to_data(p) for p in world]).astype(int)
    assert np.allclose(pixels, np.rint(world))
    dark = np.stack([np.asarray(layer.data[0][r, c]) for r, c in pixels])[:, 0] < 170
    assert dark.mean() > 0.95
    # each of those nuclei lies inside its own spot's circle (radius 55 full-resolution px) of the spots layer
    barcodes = list(read_spaceranger(scan.outs).obs_names)
    own = yx[[barcodes.index(s) for s in nuclei["spot"]]]
    assert (np.linalg.norm(world - own, axis=1) < 55.0).all()

    # the TIFF alone (dropped, no viewer): at the identity; the folder and the TIFF together: its image
    alone = napari_get_reader(str(scan.image_path))(str(scan.image_path))
    assert len(alone) == 1 and np.allclose(alone[0][1]["affine"], np.eye(3)) and alone[0][1]["multiscale"]
    run = _copy_outs(scan, tmp_path / "bare")
    assert [t[2] for t in napari_get_reader(str(run))(str(run))] == ["image", "points"]  # hires PNG only
    both = napari_get_reader([str(run), str(scan.image_path)])([str(run), str(scan.image_path)])
    assert isinstance(both[0][0], Pyramid) and both[0][0].source == scan.image_path and len(both) == 2
    # a small plain TIFF is left to napari's own reader
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((100, 100, 3), np.uint8))
    assert napari_get_reader(str(small)) is None


def test_spatialdata_multiscale_image_opens_as_a_pyramid(tmp_path):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    from napari_cell2location._reader import napari_get_reader
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=30, n_genes=40, n_cell_types=3, n_batches=1, seed=2)
    sdata = data.to_spatialdata()
    name = f"{data.library_id}_hires_image"
    single = sdata.images[name]
    sdata.images[name] = Image2DModel.parse(
        single.data, dims=("c", "y", "x"), scale_factors=[2, 2], c_coords=["r", "g", "b"],
        transformations=sd.transformations.get_transformation(single, get_all=True),
    )  # fmt: skip
    path = tmp_path / "multiscale.zarr"
    sdata.write(path)
    layers = napari_get_reader(str(path))(str(path))
    (data_, kwargs, kind) = layers[0]
    assert kind == "image" and isinstance(data_, Pyramid) and kwargs["multiscale"] and len(data_) == 3
    assert data_.shape == data.image.shape and all(hasattr(level, "dask") for level in data_)
    assert np.allclose(np.asarray(kwargs["affine"])[:2, :2], np.eye(2) / data.scalefactors["tissue_hires_scalef"])
    assert np.array_equal(np.asarray(data_[0]), data.image)


# --------------------------------------------------------------------------- detection under the spots
class _CountingImage:
    """An image that counts the pixels read from it (the detector reads it tile by tile)."""

    def __init__(self, array):
        self.array, self.pixels, self.reads = array, 0, 0

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)

    def __getitem__(self, index):
        block = np.asarray(self.array[index])
        self.pixels += block.shape[0] * block.shape[1]
        self.reads += 1
        return block


def test_detect_on_finest_level_under_some_spots_counts_match_truth_with_bounded_memory(scan):
    adata = read_spaceranger(scan.outs)
    pyramid = fullres_image_for(scan.outs, adata=adata)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(adata.n_obs, 40, replace=False))
    spots = adata.obsm["spatial"][chosen, ::-1]
    radius = next(iter(adata.uns["spatial"].values()))["scalefactors"]["spot_diameter_fullres"] / 2
    counting = _CountingImage(pyramid[0])
    seen = []
    tracemalloc.start()
    try:
        found = detect_in_spots(
            [counting, *pyramid[1:]], spots=spots, spot_radius=radius, chunk_size=1024, progress=seen.append
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # per-spot counts against the truth
    truth = scan.n_cells.loc[adata.obs_names[chosen]].to_numpy()
    assert np.corrcoef(found.counts, truth)[0, 1] >= 0.9
    assert found.counts.mean() == pytest.approx(truth.mean(), rel=0.1)
    assert found.table.attrs["pixel_size_um"] == pytest.approx(0.5)  # from the 55 µm spots
    # only the tiles under the chosen spots were read, one at a time, with progress for each
    assert found.n_tiles_total == (SIZE // 1024) ** 2 and 1 <= found.n_tiles <= 0.05 * found.n_tiles_total
    assert counting.reads == found.n_tiles and [p.tile for p in seen] == list(range(1, found.n_tiles + 1))
    halo = 128  # the detector's halo at 7 µm nuclei, 0.5 µm/px, is about 90 px
    assert counting.pixels <= found.n_tiles * (1024 + 2 * halo) ** 2
    assert counting.pixels < 0.05 * SIZE * SIZE
    assert peak < 160 * 2**20 < pyramid.nbytes / 7  # peak Python/numpy memory: a few tiles, not the 1.2 GB image
    # the boxes read are the spots' circles plus one nucleus
    boxes = spot_regions(spots, radius, pyramid.shape, margin=14.0)
    assert np.allclose(boxes[:, 1] - boxes[:, 0], 2 * (radius + 14.0))


def test_detect_in_spots_through_an_affine_matches_truth():
    """A hires image (one px = 4 world units): spots in world coordinates, detection in image pixels."""
    from napari_cell2location.datasets import HIRES_SCALEF, synthetic_visium

    data = synthetic_visium(n_spots=40, n_genes=40, n_cell_types=3, n_batches=1, seed=5)
    to_world = np.diag([1 / HIRES_SCALEF, 1 / HIRES_SCALEF, 1.0])
    spots = data.adata.obsm["spatial"][:, ::-1]
    found = detect_in_spots(data.image, spots=spots, spot_radius=55.0, image_to_world=to_world, chunk_size=128)
    assert found.table.attrs["pixel_size_um"] == pytest.approx(2.0)
    assert np.corrcoef(found.counts, data.truth["n_cells"].to_numpy())[0, 1] >= 0.9
    assert np.allclose(found.world, found.table[["row", "col"]].to_numpy() / HIRES_SCALEF)
    with pytest.raises(ValueError, match="spot_radius"):
        detect_in_spots(data.image, spots=spots)


def test_fullres_modules_import_without_qt_or_napari():
    code = (
        "import json, sys\n"
        "import napari_cell2location.io._fullres, napari_cell2location.nuclei._fullres\n"
        "import napari_cell2location.datasets._fullres\n"
        "print(json.dumps(sorted(m for m in ('qtpy', 'napari', 'magicgui', 'PyQt6', 'vispy') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_counts_table_is_written_as_spaceranger_reads_it(scan):
    adata = read_spaceranger(scan.outs)
    pos = pd.read_csv(scan.outs / "spatial" / "tissue_positions.csv")
    assert list(adata.obs_names) == list(pos["barcode"]) and adata.n_obs == 100
    assert np.allclose(adata.obsm["spatial"], scan.spatial)
    assert np.array_equal(adata.X.toarray(), scan.data.adata.X.toarray())


def test_a_tiff_without_pyramid_gets_lazy_coarser_levels(tmp_path, caplog):
    """A single-level scan (tiled, 5,120²) opens with subsampled views as coarser levels, and a warning."""
    path = tmp_path / "flat.tif"
    rng = np.random.default_rng(0)
    tiles = (rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(100))
    tifffile.imwrite(path, tiles, shape=(5120, 5120, 3), dtype=np.uint8, tile=(512, 512), photometric="rgb",
                     compression="zlib")  # fmt: skip
    pyramid = open_fullres_image(path)
    assert pyramid.virtual and [lv.shape[0] for lv in pyramid] == [5120, 2560, 1280, 640]
    assert np.array_equal(np.asarray(pyramid[2][:3, :3]), np.asarray(pyramid[0][:12:4, :12:4]))
    assert "flat.tif has no pyramid" in caplog.text
