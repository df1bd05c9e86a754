"""Packaging: the napari manifest is found by npe2 (editable install and built wheel); the core imports without Qt."""

from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

DIST_NAME = "napari-cell2location"
ENTRY_POINT_VALUE = "napari_cell2location:napari.yaml"
REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "napari.yaml"


def _run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout; fail the test with stderr if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_manifest_file_is_valid():
    data = yaml.safe_load(MANIFEST.read_text())
    assert data["name"] == DIST_NAME
    packaged = REPO / "src" / "napari_cell2location" / "napari.yaml"
    assert packaged.exists(), "src/napari_cell2location/napari.yaml (symlink to ../../napari.yaml) is missing"
    assert packaged.resolve() == MANIFEST.resolve()


def test_npe2_finds_manifest_from_installed_distribution():
    import npe2

    manifest = npe2.PluginManifest.from_distribution(DIST_NAME)
    assert manifest.name == DIST_NAME
    assert manifest.package_metadata is not None
    import napari_cell2location

    assert manifest.package_metadata.version == napari_cell2location.__version__


def test_npe2_plugin_manager_discovers_plugin():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    manifest = pm.get_manifest(DIST_NAME)
    assert manifest.name == DIST_NAME
    assert DIST_NAME in {m.name for m in pm.iter_manifests()}


def test_reader_claims_only_what_it_reads(tmp_path):
    """napari asks the user to choose a reader whenever two plugins' patterns match a file: the manifest
    names only the files this reader reads (spatial .h5ad, .zarr, TIFF-like scans) and folders, so an
    image, a table or an array opens in napari's own reader without asking."""
    from npe2 import PluginManager

    from napari_cell2location.io._fullres import TIFF_SUFFIXES

    pm = PluginManager()
    pm.discover(include_npe1=False)

    def ours(path) -> bool:
        return DIST_NAME in {r.plugin_name for r in pm.iter_compatible_readers([str(path)])}

    folder = tmp_path / "outs"
    folder.mkdir()
    for name in ("section.h5ad", "Section.H5AD", "store.zarr", "scan.ome.tif", *(f"scan{s}" for s in TIFF_SUFFIXES)):
        assert ours(tmp_path / name), name
    assert ours(folder)
    for name in ("photo.png", "photo.jpg", "table.csv", "array.npy", "notes.txt", "matrix.h5"):
        assert not ours(tmp_path / name), name


@pytest.mark.slow
def test_wheel_ships_manifest_and_npe2_finds_it(tmp_path):
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
        + [str(REPO), "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = sorted(dist.glob("napari_cell2location-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, found {[w.name for w in dist.iterdir()]}"
    wheel = wheels[0]

    # the manifest lies in the wheel as a real file (not a symlink) with the manifest's content
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_cell2location/napari.yaml" in names, names
        info = zf.getinfo("napari_cell2location/napari.yaml")
        mode = info.external_attr >> 16
        assert not stat.S_ISLNK(mode), "napari.yaml is stored as a symlink in the wheel"
        assert zf.read(info).decode() == MANIFEST.read_text()
        (entry_points_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(entry_points_name).decode())
    assert entry_points["napari.manifest"][DIST_NAME] == ENTRY_POINT_VALUE
    assert entry_points["console_scripts"][DIST_NAME] == "napari_cell2location._cli:main"

    # installed from the wheel alone, npe2 discovers the manifest file that came in the wheel
    target = tmp_path / "target"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip install --target failed:\n{proc.stdout}\n{proc.stderr}"
    assert (target / "napari_cell2location" / "napari.yaml").is_file()
    assert not (target / "napari_cell2location" / "napari.yaml").is_symlink()

    env = {**os.environ, "PYTHONPATH": str(target)}
    code = f"""
        import json, sys
        # hide the editable source tree so that only the wheel's copy can be found
        src = {str(REPO / "src")!r}
        sys.path[:] = [p for p in sys.path if not p.startswith(src)]
        import npe2
        from npe2 import PluginManager
        import napari_cell2location

        manifest = npe2.PluginManifest.from_distribution({DIST_NAME!r})
        pm = PluginManager()
        pm.discover(include_npe1=False)
        discovered = pm.get_manifest({DIST_NAME!r})
        print(json.dumps({{
            "module": napari_cell2location.__file__,
            "name": manifest.name,
            "source": str(getattr(manifest, "_source_file", "") or ""),
            "discovered_name": discovered.name,
            "discovered_source": str(getattr(discovered, "_source_file", "") or ""),
        }}))
    """
    out = json.loads(_run_python(code, env=env, cwd=tmp_path).strip().splitlines()[-1])
    target = target.resolve()
    assert Path(out["module"]).resolve().is_relative_to(target), out
    assert out["name"] == out["discovered_name"] == DIST_NAME
    for key in ("source", "discovered_source"):
        if out[key]:  # npe2 records the file it read (private attribute; checked when present)
            assert Path(out[key]).is_relative_to(target), out


#: every module of the core (no Qt, no napari): the GUI lives in _qt/ and the npe2 hooks only
CORE_MODULES = [
    "napari_cell2location",
    "napari_cell2location.datasets",
    "napari_cell2location.io",
    "napari_cell2location.model",
    "napari_cell2location.nuclei",
    "napari_cell2location.reference",
    "napari_cell2location.plotting",
    "napari_cell2location._layers",
    "napari_cell2location._infer",
    "napari_cell2location._contract",
    "napari_cell2location._jobs",
    "napari_cell2location._bin_sizes",
    "napari_cell2location._variants",
    "napari_cell2location._cli",
    "napari_cell2location.io._fullres",
    "napari_cell2location.io._fullres_find",
    "napari_cell2location.nuclei._fullres",
    "napari_cell2location.nuclei._signal",
    "napari_cell2location.datasets._fullres",
    "napari_cell2location.io._visium_hd",
    "napari_cell2location.datasets._visium_hd",
    "napari_cell2location._infer._distributed",
    "napari_cell2location._infer._checkpoint_parallel",
    "napari_cell2location.model._parallel",
    "napari_cell2location.model._persist",
]
GUI_MODULES = ["qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy"]


def _gui_modules_loaded(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; returns the JSON it prints last, with ``gui``: the GUI
    modules then in ``sys.modules``."""
    code = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json as _json, sys as _sys
        _out = globals().get("out", {{}})
        _out["gui"] = sorted(m for m in {GUI_MODULES!r} if m in _sys.modules)
        print(_json.dumps(_out))
        """
    )
    return json.loads(_run_python(code, env=env).strip().splitlines()[-1])


def test_core_imports_without_qt_or_napari():
    code = f"""
        import importlib, sys
        for name in {CORE_MODULES!r}:
            importlib.import_module(name)
        from napari_cell2location import Cell2location  # noqa: F401
        import napari_cell2location._cli
        parser = napari_cell2location._cli.build_parser()
        out = {{
            "imported": [name for name in {CORE_MODULES!r} if name in sys.modules],
            "fit": vars(parser.parse_args(["fit", "a.h5ad", "--signatures", "s.csv", "--out", "o.h5ad"])),
        }}
    """
    out = _gui_modules_loaded(code)
    assert out["imported"] == CORE_MODULES
    assert out["fit"]["command"] == "fit" and out["fit"]["spatial"] == "a.h5ad" and out["fit"]["model"] == "main"
    assert out["gui"] == [], f"importing the core pulled in GUI modules: {out['gui']}"


def test_cli_import_does_not_import_napari():
    """The GUI demo is behind a lazy import: the command line module alone loads no GUI."""
    out = _gui_modules_loaded(
        """
        import sys
        import napari_cell2location._cli
        out = {"cli": "napari_cell2location._cli" in sys.modules}
        """
    )
    assert out == {"cli": True, "gui": []}


def test_cli_fit_runs_headless_without_gui(tmp_path, make_tiny):
    """`napari-cell2location fit` on an .h5ad and a signatures CSV, in a fresh interpreter: exit status
    0, results written, and no GUI module imported on the way."""
    import anndata

    adata, sig, _ = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    spatial, sig_path, result = tmp_path / "spatial.h5ad", tmp_path / "sig.csv", tmp_path / "res.h5ad"
    adata.write_h5ad(spatial)
    sig.to_csv(sig_path)
    argv = ["fit", str(spatial), "--signatures", str(sig_path), "--out", str(result)]
    argv += ["--max-epochs", "2", "--quiet", "--device", "cpu"]
    out = _gui_modules_loaded(
        f"""
        from napari_cell2location._cli import main
        out = {{"rc": main({argv!r})}}
        """,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out["rc"] == 0
    assert out["gui"] == [], f"the headless CLI pulled in GUI modules: {out['gui']}"
    res = anndata.read_h5ad(result)
    assert list(res.obs_names) == list(adata.obs_names)
    for k in ("means", "stds", "q05", "q95"):
        assert list(res.obsm[f"{k}_cell_abundance_w_sf"].columns) == [
            f"{k}cell_abundance_w_sf_{t}" for t in sig.columns
        ]


def test_package_import_is_light():
    code = """
        import json, sys
        import napari_cell2location
        heavy = ["torch", "pyro", "anndata", "spatialdata", "dask", "qtpy", "napari"]
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
    """
    loaded = json.loads(_run_python(code).strip().splitlines()[-1])
    assert loaded == [], f"`import napari_cell2location` loaded heavy modules eagerly: {loaded}"


def test_manifest_widgets_resolve_to_classes():
    """Every command of the manifest points at a callable that exists."""
    import importlib

    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-cell2location")
    names = {w.display_name for w in manifest.contributions.widgets}
    assert {"Cell2location", "Reference signatures", "Cells per spot"} <= names
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name
