"""Shared pytest fixtures."""

from __future__ import annotations

# ==== engine fixtures (tests/test_engine_*.py) ==============================================
from pathlib import Path

import pytest
import torch

from engine_helpers import SAMPLE_DIR, TINY_VIT_SPEC, tiny_sam
from medsam_engine import Segmenter, load_model
from medsam_engine.datastore import list_cases
from medsam_engine.imageio import Volume, read_image
from medsam_engine.models import SamModel, build_sam_vit


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SAM's state dict saved with torch.save, as a MedSAM checkpoint would be."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam_vit.pth"
    torch.save(tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_model(tiny_vit_checkpoint: Path) -> SamModel:
    """The tiny checkpoint loaded through the engine's real ViT loading code."""
    return build_sam_vit(tiny_vit_checkpoint, TINY_VIT_SPEC, name="tiny-vit")


@pytest.fixture(scope="session")
def lite_model() -> SamModel:
    """The real LiteMedSAM with its bundled weights, on the CPU."""
    return load_model("medsam-lite", device="cpu")


@pytest.fixture(scope="session")
def lite_segmenter(lite_model: SamModel) -> Segmenter:
    return Segmenter(lite_model)


@pytest.fixture(scope="session")
def sample_volume():
    """Reader of a sample image and its label: sample_volume("ct_3mm") -> (image, label) Volumes."""
    loaded: dict[str, tuple[Volume, Volume]] = {}

    def get(name: str) -> tuple[Volume, Volume]:
        if name not in loaded:
            loaded[name] = (read_image(SAMPLE_DIR / f"{name}.nii.gz"),
                            read_image(SAMPLE_DIR / "labels" / "final" / f"{name}.nii.gz"))
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def mr_cases() -> list:
    """The sample datastore's mr_3mm case, alone (the training tests' volume)."""
    return [c for c in list_cases(SAMPLE_DIR) if c.image_id == "mr_3mm"]
# ==== end of engine fixtures =================================================================


# ==== app fixtures (tests/test_app_*.py) =====================================================
from app_helpers import start_test_server  # noqa: E402
from medsam_http.server import LabelServer  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> LabelServer:
    """A real `monailabel start_server --app apps/medsam` on a free loopback port, on a copy of the
    sample data; stopped after the session. A failing test that used it gets the server log."""
    srv = start_test_server(tmp_path_factory.mktemp("app-server"))
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    srv = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(srv, LabelServer):
        report.sections.append(("MONAI Label server log (tail)", srv.log_tail()))
    stack = getattr(item, "funcargs", {}).get("dicomweb_stack")
    if report.failed and stack is not None:
        report.sections.append(("MONAI Label server log (tail)", stack.server.log_tail()))
        report.sections.append(("Orthanc log (tail)", stack.orthanc.log_tail()))
# ==== end of app fixtures ====================================================================


# ==== DICOMweb fixtures (tests/test_dicomweb_*.py) ==========================================
from dicomweb_helpers import Stack, start_label_server  # noqa: E402
from medsam_http.dicom_samples import load_samples  # noqa: E402
from medsam_http.orthanc import OrthancServer, is_installed  # noqa: E402


@pytest.fixture(scope="module")
def dicomweb_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A real Orthanc (DICOMweb plugin) on a free loopback port holding the sample CT and MR series,
    and the medsam server with `--studies <its DICOMweb URL>`; one per test module, so SEGs saved
    by one module do not change what another sees."""
    if not is_installed():
        pytest.skip("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (scripts/setup.sh does)")
    workdir = tmp_path_factory.mktemp("dicomweb")
    orthanc = OrthancServer(workdir / "orthanc").start()
    try:
        series = load_samples(orthanc.dicomweb_url)
        server = start_label_server(orthanc.dicomweb_url, workdir)
    except BaseException:
        orthanc.stop()
        raise
    stack = Stack(orthanc, server, series, workdir)
    yield stack
    stack.server.stop()
    orthanc.stop()
# ==== end of DICOMweb fixtures ===============================================================
