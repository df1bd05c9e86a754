"""Running a job generator to its end.

Every long job of the package is a generator (``iter_train``, ``iter_fit``, ``iter_detect_nuclei``,
``iter_detect_in_spots``): it yields progress records and returns its result. The blocking
functions (``train``, ``fit``, ``detect_nuclei``, ``detect_in_spots``) run it here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def run_to_end(gen: Iterator, each: Callable[[Any], None] | None = None):
    """Advance ``gen`` until it returns, calling ``each`` with every record it yields.

    Returns the generator's return value (``StopIteration.value``). An exception raised by ``each``
    propagates and leaves ``gen`` suspended; the caller's ``finally`` (or garbage collection) closes it.
    """
    while True:
        try:
            rec = next(gen)
        except StopIteration as stop:
            return stop.value
        if each is not None:
            each(rec)
