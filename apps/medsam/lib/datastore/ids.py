"""Which ids and tags name a file of a datastore: the one rule, applied where a datastore turns an id
into a path (local.py, dicomweb.py), so that every caller (routes, strategies, scoring, training)
is held to it.

An id is a file name without its extension, as the datastore lists it: any characters a file name
may hold (spaces, commas, parentheses, `+`, non-ASCII...) except a path separator (`/`, `\\`) or
NUL, not `.` or `..`, and at most 255 bytes with its extension. The file it names must lie inside
the datastore's folder once links are followed.
"""

from __future__ import annotations

import os

from lib.datastore.errors import InvalidId

MAX_NAME_BYTES = 255  # NAME_MAX on Linux file systems


def _name_bytes(name: str) -> int:
    try:
        return len(os.fsencode(name))
    except UnicodeEncodeError:
        return MAX_NAME_BYTES + 1


def check_name(value: object, what: str) -> str:
    """`value` when it can be one file (or folder) name in the datastore's folder, else InvalidId."""
    if (not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0")
            or _name_bytes(value) > MAX_NAME_BYTES):
        raise InvalidId(f"{what} {value!r} is not a valid id: an id is a file name in the datastore, with no "
                        "'/', '\\' or NUL, not '.' or '..', at most 255 bytes")
    return value


def inside(root: str, path: str, what: str) -> str:
    """The real path of `path` (links followed) when it lies inside the folder `root`, else InvalidId."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if real == base or os.path.commonpath([real, base]) != base or _name_bytes(os.path.basename(path)) > MAX_NAME_BYTES:
        raise InvalidId(f"{what} is not a valid id: its file {os.path.basename(path)!r} is not inside the datastore "
                        "(a link out of it, or a name too long)")
    return real
