from .dicomweb import ImageNotFound, LabelRejected, StoreFailed, dicomweb_datastore, series_modality

__all__ = ["ImageNotFound", "LabelRejected", "StoreFailed", "dicomweb_datastore", "series_modality"]
