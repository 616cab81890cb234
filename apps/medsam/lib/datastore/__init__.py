from .dicomweb import ImageNotFound, StoreFailed, dicomweb_datastore, series_modality
from .seg import LabelRejected

__all__ = ["ImageNotFound", "LabelRejected", "StoreFailed", "dicomweb_datastore", "series_modality"]
