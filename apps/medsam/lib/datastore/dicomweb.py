"""MONAI Label's DICOMweb datastore, made to work offline and to keep what it is given.

Differences from `monailabel.datastore.dicom.DICOMWebDatastore` as MONAI Label sets it up:
- nothing is downloaded: MONAI Label fetches dcmqi from GitHub when a DICOMweb datastore starts
  and writes DICOM SEG with it; here SEG is written with pydicom-seg (see seg.py);
- a saved label is checked against the series first (readable, same grid, not empty): a bad one
  is refused (`LabelRejected`) and nothing is stored; a good one goes to the PACS as DICOM SEG
  through STOW-RS, and the series is listed as labelled at once;
- all image series are listed (MONAI Label's default search filter is CT only), without the
  PACS's non-image series (SEG, SR, RTSTRUCT...); MONAI_LABEL_DICOMWEB_SEARCH_FILTER still applies
  when set to anything but MONAI Label's default;
- each series' DICOM Modality is kept, so the infer task can preprocess by it;
- an id is held to ids.py where it becomes a path in the cache (MONAI Label joins any id to the
  cache folder); an unknown series is `ImageNotFound`, and a server that cannot be reached or
  refuses is `UpstreamError` (502) or `UpstreamTimeout` (504) with its reason, not a missing image;
- the local cache (converted series, label copies for training, its JSON) is written atomically,
  as the local datastore is (local.py): a crash mid-write does not stop the next start.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import requests
import SimpleITK as sitk
from cachetools import TTLCache, cached
from dicomweb_client import DICOMwebClient
from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.dataset import Dataset

from medsam_engine import EngineInputError
from medsam_engine.preprocess import normalise_modality

from lib.datastore.errors import ImageNotFound, StoreFailed, UpstreamError, UpstreamTimeout
from lib.datastore.ids import check_name, inside
from lib.datastore.local import AtomicLocalDatastore
from lib.datastore.seg import read_label, read_series, write_seg
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "DOC", "FID", "RWV", "AU", "ECG", "HD", "PLAN"})
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}


class MedSAMDICOMwebDatastore(DICOMWebDatastore, AtomicLocalDatastore):
    def __init__(self, client: DICOMwebClient, search_filter: Dict[str, Any], **kwargs: Any) -> None:
        self._modalities: Dict[str, str] = {}
        super().__init__(client=client, search_filter=search_filter, **kwargs)

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def list_images(self) -> List[str]:
        images = []
        with self.pacs():
            found = self._client.search_for_series(search_filters=self._search_filter)
        for item in found:
            meta = Dataset.from_json(item)
            modality = str(meta.get("Modality", "") or "").upper()
            if modality in NON_IMAGE_MODALITIES:
                continue
            uid = str(meta.SeriesInstanceUID)
            self._modalities[uid] = modality
            images.append(uid)
        return images

    @contextmanager
    def pacs(self) -> Iterator[None]:
        """Requests to the DICOMweb server inside: its failures raised as UpstreamError (502) or
        UpstreamTimeout (504), naming the server and its reason."""
        try:
            yield
        except requests.Timeout as exc:
            raise UpstreamTimeout(f"the DICOMweb server {self.name()} did not answer in time: {exc}") from exc
        except requests.HTTPError as exc:
            raise UpstreamError(f"the DICOMweb server {self.name()} answered {exc}") from exc
        except requests.RequestException as exc:
            raise UpstreamError(f"the DICOMweb server {self.name()} cannot be reached: {exc}") from exc

    def find_series(self, image_id: str) -> Optional[Dataset]:
        """The series' QIDO answer, None when the server has no series with this UID."""
        with self.pacs():
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        matches = [Dataset.from_json(item) for item in found or ()]
        return next((m for m in matches if str(m.get("SeriesInstanceUID", "")) == image_id), None)

    def get_image_uri(self, image_id: str) -> str:
        """The series in the local cache (downloaded and converted on first use): InvalidId for an id
        that is no file name in the cache, ImageNotFound when the server has no such series."""
        cached = os.path.join(self._datastore.image_path(), check_name(image_id, "image id"))
        inside(self._datastore_path, cached, repr(image_id))
        if not (os.path.isdir(cached) and os.listdir(cached)) and self.find_series(image_id) is None:
            raise ImageNotFound(f"unknown image id {image_id!r}: no such series on {self.name()}")
        with self.pacs():
            uri = super().get_image_uri(image_id)
        registered = LocalDatastore.get_image_uri(self, image_id)
        if registered and os.path.exists(registered) and os.path.realpath(uri) != os.path.realpath(registered):
            # On first use MONAI Label converts the series to a temporary NIfTI, registers a copy of
            # it in the cache datastore and returns the temporary one: use (and keep) only the copy.
            os.unlink(uri)
            return registered
        return uri

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """MONAI Label's (a final label is downloaded from its SEG), with the ids held to ids.py."""
        folder = os.path.join(self._datastore.label_path(check_name(label_tag, "tag")), check_name(label_id, "label id"))
        inside(self._datastore_path, folder, repr(label_id))
        with self.pacs():
            return super().get_label_uri(label_id, label_tag, image_id)

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        # One entry per series, however many SEGs reference it.
        return list(dict.fromkeys(super().get_labeled_images(label_tag, labels)))

    def modality(self, image_id: str) -> str:
        """The series' DICOM Modality ("" when the server does not know the series)."""
        if image_id not in self._modalities:
            found = self.find_series(image_id)
            if found is None:
                return ""
            self._modalities[image_id] = str(found.get("Modality", "") or "").upper()
        return self._modalities[image_id]

    def forget_listings(self) -> None:
        """Drop the cached QIDO answers, so a SEG just stored shows in the listings."""
        type(self).list_images.cache_clear()
        DICOMWebDatastore.get_labeled_images.cache_clear()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        check_name(label_tag, "tag")
        self.get_image_uri(image_id)  # downloads the series into the cache (and converts it, as configured)
        reference, files = read_series(os.path.join(self._datastore.image_path(), image_id))
        label = read_label(label_filename, reference)
        label_info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL:
            label_info.update(self._store_seg(image_id, label, files, label_info))
        return self._save_local_copy(image_id, label, label_tag, label_info)

    def _store_seg(self, image_id: str, label: sitk.Image, files: list, label_info: Dict[str, Any]) -> Dict[str, Any]:
        seg = write_seg(label, files, label_info, description="MedSAM label")
        try:
            result = self._client.store_instances([seg])
        except requests.Timeout as exc:
            raise UpstreamTimeout(f"{self.name()} did not answer in time storing the DICOM SEG: {exc}") from exc
        except requests.RequestException as exc:
            raise StoreFailed(f"{self.name()} did not store the DICOM SEG: {exc}") from exc
        if result is not None and result.get("FailedSOPSequence"):
            raise StoreFailed(f"{self.name()} refused the DICOM SEG: {result.FailedSOPSequence}")
        self.forget_listings()
        logger.info("Stored DICOM SEG %s for series %s", seg.SeriesInstanceUID, image_id)
        return {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID),
                "StudyInstanceUID": str(seg.StudyInstanceUID), "PatientID": str(seg.get("PatientID", "")),
                "Modality": self.modality(image_id)}

    def _save_local_copy(self, image_id: str, label: sitk.Image, label_tag: str, label_info: Dict[str, Any]) -> str:
        """The label on the image's grid in the local cache datastore, where MONAI Label's training
        reads it (only when the series was converted and registered there, as MONAI Label does)."""
        if image_id not in self._datastore.objects:
            return image_id
        return self.store_label(image_id, label, label_tag, label_info)


def _search_filter() -> Dict[str, Any]:
    """MONAI_LABEL_DICOMWEB_SEARCH_FILTER, except MONAI Label's default (CT only): every series.

    (`monailabel start_server` exports every setting to the environment, so a default cannot be
    told apart from the same value set by the user.)"""
    search = settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
    return {} if search == MONAI_LABEL_DEFAULT_FILTER else search


def dicomweb_datastore(url: str) -> MedSAMDICOMwebDatastore:
    """The datastore for `--studies http(s)://.../dicom-web`, with MONAI Label's client settings
    (credentials, QIDO/WADO/STOW prefixes, cache path, fetch by frame, NIfTI conversion)."""
    if "googleapis.com" in url:
        client: DICOMwebClient = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return MedSAMDICOMwebDatastore(client, _search_filter(), cache_path=cache_path or None,
                                   fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                                   convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)


def series_modality(datastore: object, image_id: str) -> str:
    """The DICOM Modality of a DICOMweb series, if the engine knows it ("" otherwise: the engine
    then infers CT or not from the intensities)."""
    if not isinstance(datastore, MedSAMDICOMwebDatastore) or not image_id:
        return ""
    modality = datastore.modality(image_id)
    try:
        return normalise_modality(modality) or ""
    except EngineInputError:
        return ""
