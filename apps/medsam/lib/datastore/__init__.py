from .dicomweb import ImageNotFound, StoreFailed, dicomweb_datastore, series_modality
from .local import ImageExists, StorageError, local_datastore
from .seg import LabelRejected

__all__ = ["ImageExists", "ImageNotFound", "LabelRejected", "StorageError", "StoreFailed", "dicomweb_datastore",
           "local_datastore", "series_modality"]
