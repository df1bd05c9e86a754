"""Notifications that fit: napari's toast shows the first line of a message (about 45 characters at its
width) and the rest only when expanded, so every message here is a short headline, then the detail on
the next line; the detail also goes to the tab's status line, where it wraps and stays."""

from __future__ import annotations

#: what napari's toast shows of a message's first line before it is expanded (characters, about)
HEADLINE_CHARS = 48


def tell(level: str, headline: str, detail: str = "", status=None) -> str:
    """Show ``headline`` (and ``detail`` under it) as a napari notification of ``level``.

    Parameters
    ----------
    level : {'info', 'warning', 'error'}
        Kind of notification.
    headline : str
        What happened, in a few words (at most :data:`HEADLINE_CHARS` to be read whole).
    detail : str
        Why and what to do; full paths are cut to their file names.
    status : magicgui Label, optional
        The tab's status line, which gets the headline and the detail.

    Returns
    -------
    str
        The message shown.
    """
    from napari.utils.notifications import show_error, show_info, show_warning

    from ..io import shorten_paths

    detail = shorten_paths(str(detail)).strip()
    message = f"{headline}\n{detail}" if detail else headline
    if status is not None:
        status.value = f"{headline} {detail}".strip()
    {"info": show_info, "warning": show_warning, "error": show_error}[level](message)
    return message
