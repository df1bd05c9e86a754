"""Files as they really arrive: broken ones get one clear :class:`InputError`, and outputs replace what was
there only once they are complete.

* :func:`reading` turns any failure to read a file into an ``InputError`` that names the file and what
  it should have been; :func:`read_h5ad` also says what an ``.h5ad`` that is not one looks like (empty,
  text, an archive, cut short).
* :func:`atomic_output` writes to a temporary name beside the target and renames it over the target at
  the end: a run that fails or is interrupted leaves an existing file (or folder) byte-identical.
* :func:`check_writable` says at once when an output cannot be written, before a long fit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ._validate import InputError

logger = logging.getLogger(__name__)

#: the first bytes of an HDF5 file (an .h5ad or Space Ranger .h5)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_STARTS = (
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PAR1", "a Parquet file"),
    (b"%PDF", "a PDF"),
)


def _short(err: BaseException, limit: int = 200) -> str:
    """One line of an exception for a message: its type and the first line of its text."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def shorten_paths(message: str) -> str:
    """``message`` with every quoted absolute path cut to its last part (``'/a/b/c.h5ad'`` -> ``'c.h5ad'``):
    a notification has room for the name, not the folders."""
    return re.sub(r"'(?:[A-Za-z]:)?[/\\][^']*[/\\]([^'/\\]+)'", r"'\1'", message)


def describe_start(path: Path) -> str:
    """What a file looks like from its first bytes: 'empty (0 bytes)', 'text starting with ...', 'a zip
    archive', ... (for messages about a file that is not what its name says)."""
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(64)
    for magic, kind in _STARTS:
        if head.startswith(magic):
            return f"{kind} ({size:,} bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data of an unknown kind ({size:,} bytes)"
    first = " ".join(text.split())[:40]
    return f"text starting with {first!r} ({size:,} bytes)"


@contextmanager
def reading(path, what: str):
    """Turn any failure inside the ``with`` block into an :class:`InputError` naming ``path`` and ``what``
    it should hold (an ``InputError`` raised inside passes as it is)."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - at the file boundary every failure becomes one clear line
        raise InputError(f"{str(path)!r} is not a readable {what} ({_short(err)}).") from err


def check_hdf5(path: Path, what: str) -> None:
    """Refuse a file that is not HDF5 (empty, text, an archive) or is cut short, saying which."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder, not {what} (an HDF5 file).")
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise InputError(
            f"{str(path)!r} is not {what}: {what} is an HDF5 file, this is {describe_start(path)}. "
            "A failed download, or another file renamed?"
        )
    import h5py

    try:
        h5py.File(path, "r").close()
    except OSError as err:
        sizes = re.search(r"eof = (\d+).*stored_eof = (\d+)", str(err))
        if sizes:
            have, need = (int(v) for v in sizes.groups())
            raise InputError(
                f"{str(path)!r} is truncated: {have:,} of its {need:,} bytes are there (a copy cut short?)."
            ) from err
        raise InputError(f"{str(path)!r} is a damaged HDF5 file ({_short(err)}).") from err


def read_h5ad(path, what: str = "AnnData .h5ad file"):
    """Read an ``.h5ad``; a file that is not one, is cut short or holds no AnnData is an :class:`InputError`.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str
        What it should hold, for messages (e.g. 'spatial counts .h5ad').

    Returns
    -------
    anndata.AnnData
    """
    import anndata

    path = Path(path).expanduser()
    check_hdf5(path, "an .h5ad")
    with reading(path, what):
        adata = anndata.read_h5ad(path)
    if adata.X is None and not len(adata.layers):
        raise InputError(f"{str(path)!r} holds no count matrix: its AnnData has no X and no layers.")
    return adata


def temporary_beside(path: Path, tag: str) -> Path:
    """A name beside ``path`` that nothing else uses, keeping its suffix (``.results.partial-1a2b.zarr``)."""
    return path.with_name(f".{path.stem}.{tag}-{uuid.uuid4().hex[:8]}{path.suffix}")


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree (nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(new: Path, target: Path) -> None:
    """Put ``new`` in place of ``target`` (a file or folder): a rename, with the old one moved aside
    first when a rename cannot replace it (a folder), and moved back if the swap fails."""
    if not target.exists() or (new.is_file() and target.is_file()):
        os.replace(new, target)  # atomic on one file system
        return
    aside = temporary_beside(target, "old")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    remove_path(aside)


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path`` to write to; at the end it replaces ``path``.

    If the block fails or is interrupted, the temporary is removed and ``path`` (a file or folder) is left
    as it was, byte for byte. Parent folders are created.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path, "partial")
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written to {tmp} for {path}")
    swap_in(tmp, path)


def check_writable(path, what: str = "output") -> Path:
    """Say at once (an :class:`InputError`) when ``path`` cannot be written: its folder cannot be made or
    written to, or it exists and cannot be replaced. Returns the path."""
    path = Path(path).expanduser()
    folder = path.parent
    while not folder.exists():  # the nearest existing ancestor must let us make the rest
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write the {what} {str(path)!r}: {str(folder)!r} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the {what} {str(path)!r}: no permission to write in {str(folder)!r}.")
    if path.exists() and not os.access(path.parent, os.W_OK):
        raise InputError(f"cannot replace the {what} {str(path)!r}: no permission to write in its folder.")
    return path
