"""Checkpoints of a data-parallel fit: one file per process, and a record of the last whole set.

Each process holds its own spots' parameters, optimiser moments and random state, so each writes its
own file, ``checkpoint.rank{r}-of-{n}.e{epochs}.pt`` (the single-process layout, see
``_checkpoint.py``). A set is whole only when every process has written its file of that epoch: the
processes then agree (one all-reduce), rank 0 records the epoch in ``checkpoint.parallel.json``
(written atomically), and each process deletes its older files. A run killed between two of these
steps leaves the last recorded set whole, and ``resume`` continues from the recorded epoch, with as
many processes as wrote it. An interruption writes nothing (the processes could not agree on it):
the last periodic set stands.

The folder must be the same for every process (one machine, or a shared file system).
"""

from __future__ import annotations

import json

from ..io import InputError, atomic_output, check_writable
from ._checkpoint import _ADVICE, FILE_NAME, FORMAT, MANIFEST_NAME, Checkpointer, read_checkpoint


def open_checkpointer(folder, every: int | None, resume: bool, parallel=None) -> Checkpointer | None:
    """The checkpointer of a training run: none without ``folder``, one file per process when ``parallel``
    (an active :class:`~napari_cell2location._infer._distributed.DataParallel`), else one file."""
    if folder is None:
        if resume:
            raise InputError("resume needs the checkpoint's folder (checkpoint_dir, --checkpoint-dir)")
        return None
    if parallel is None:
        return Checkpointer(folder, every, resume)
    return ParallelCheckpointer(folder, every, resume, parallel)


class ParallelCheckpointer(Checkpointer):
    """:class:`Checkpointer` for one process of a data-parallel fit (``parallel``, a
    :class:`~napari_cell2location._infer._distributed.DataParallel`); every process makes one."""

    PARALLEL = True

    def __init__(self, folder, every: int | None, resume: bool, parallel):
        self.parallel = parallel
        super().__init__(folder, every, resume)

    def _open(self, folder):
        if (folder / FILE_NAME).exists():
            raise InputError(
                f"{str(folder / FILE_NAME)!r} is the checkpoint of a one-process fit: resume it without torchrun, "
                f"or {_ADVICE}."
            )
        self.manifest = check_writable(folder / MANIFEST_NAME, "checkpoint")
        self.path = self._file(0)
        return self.manifest

    def _read_saved(self) -> dict:
        self.path = self._file(self._recorded_epochs())
        if not self.path.exists():
            raise InputError(
                f"{str(self.path)!r}, process {self.parallel.rank}'s part of the checkpoint, is missing; {_ADVICE}."
            )
        return read_checkpoint(self.path)

    def _partial_pattern(self) -> str:
        return f".checkpoint.rank{self.parallel.rank}-of-*.partial-*"

    def _file(self, epochs: int):
        p = self.parallel
        return self.folder / f"checkpoint.rank{p.rank}-of-{p.world_size}.e{int(epochs)}.pt"

    def _recorded_epochs(self) -> int:
        try:
            record = json.loads(self.manifest.read_text())
            if record.get("format") != FORMAT:
                raise ValueError("not a checkpoint record")
            processes, epochs = int(record["processes"]), int(record["epochs"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"{str(self.manifest)!r} is not a readable checkpoint record ({err}); {_ADVICE}.") from err
        if processes != self.parallel.world_size:
            raise InputError(
                f"{str(self.manifest)!r} is the checkpoint of a fit over {processes} processes; resume it with "
                f"{processes} (torchrun --nproc-per-node {processes}), not {self.parallel.world_size}."
            )
        return epochs

    def epoch_end(self, optim, stopped: str | None = None, interrupted: bool = False) -> None:
        if interrupted:  # the other processes may not be here: the last whole set stands
            return
        super().epoch_end(optim, stopped, interrupted)

    def write(self, optim) -> None:
        """Write this process's file, agree that every process did, record the set, drop older files."""
        epochs = len(self.est._history)
        self.path = self._file(epochs)
        error = None
        try:
            super().write(optim)
        except Exception as err:  # noqa: BLE001 - reported after the others have heard of it
            error = err
        (failed,) = self.parallel.sum(0.0 if error is None else 1.0)
        if not failed and self.parallel.is_main:
            record = {"format": FORMAT, "processes": self.parallel.world_size, "epochs": epochs}
            with atomic_output(self.manifest) as tmp:
                tmp.write_text(json.dumps(record))
        self.parallel.barrier()  # the record is on disk before anyone drops the set it replaced
        if not failed:
            for old in self.folder.glob(f"checkpoint.rank{self.parallel.rank}-of-{self.parallel.world_size}.e*.pt"):
                if old != self.path:
                    old.unlink(missing_ok=True)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{int(failed)} other process(es) could not write their part")
