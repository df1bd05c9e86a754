"""Where a fit runs, and moving values between torch, numpy and JSON."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..io import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu'; 'cuda' / 'cuda:n' (checked).

    Parameters
    ----------
    device : str or torch.device
        Requested device.

    Returns
    -------
    torch.device
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda[:n]'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {str(device)!r} was requested but CUDA is not available here; use 'cpu' or 'auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present.")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda[:n]'.")
    return dev


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA ...)' or 'cpu (2 threads)', for logs and the GUI."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` CPU threads for torch's operations (None: leave the number as it is), then
    restore the previous number. The setting is process-wide."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_numpy(value) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def json_ready(value):
    """``value`` with numpy arrays and scalars turned into lists and Python numbers (recursively)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
