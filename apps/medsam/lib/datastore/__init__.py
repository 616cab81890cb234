from .dicomweb import dicomweb_datastore, series_modality
from .errors import (ImageExists, ImageNotFound, InvalidId, LabelRejected, StorageError, StoreFailed, UpstreamError,
                     UpstreamTimeout)
from .local import local_datastore

__all__ = ["ImageExists", "ImageNotFound", "InvalidId", "LabelRejected", "StorageError", "StoreFailed",
           "UpstreamError", "UpstreamTimeout", "dicomweb_datastore", "local_datastore", "series_modality"]
