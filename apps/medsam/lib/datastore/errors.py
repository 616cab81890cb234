"""What the datastores raise, each answered with one HTTP status (the table is in lib/endpoints/errors.py)."""

from __future__ import annotations


class InvalidId(ValueError):
    """An image id, label id or tag that names no file of the datastore: a path, or a name whose
    file lies outside the datastore's folder (a link out). 400."""


class ImageNotFound(LookupError):
    """No image with this id in the datastore (or on its DICOMweb server). 404."""


class ImageExists(Exception):
    """An image with this id is stored already (adding it again would replace it). 409."""


class UnreadableFile(ValueError):
    """An image file that is not one whole image (corrupt, truncated, lying about its size). 400."""


class LabelRejected(ValueError):
    """A label that cannot be stored as given (unreadable, empty, or not on the image's grid). 400."""


class StorageError(OSError):
    """The datastore's disk refused a write (full, read-only, file too large). 507."""


class UpstreamError(RuntimeError):
    """The DICOMweb server (PACS) cannot be reached, or refused a request. 502."""


class UpstreamTimeout(UpstreamError):
    """The DICOMweb server did not answer in time. 504."""


class StoreFailed(UpstreamError):
    """The DICOMweb server did not store the SEG. 502."""
