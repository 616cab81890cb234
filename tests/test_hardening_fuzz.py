"""Bad input, generated with hypothesis and thrown at the running server: boxes, clicks and ROIs
out of bounds, zero-area, non-finite, non-numeric or huge; image, label, session and tag ids that
are paths (relative, absolute, URL-encoded) or junk, and file names as hospital exports write them
(spaces, commas, parentheses, `+`, `%`, non-ASCII: unknown, so 404, never refused for their characters); corrupt, truncated and lying NIfTI, NRRD,
MetaImage, PNG and DICOM uploads; labels of the wrong shape, type or geometry; malformed JSON and
multipart; bodies over the upload limit; and every route MONAI Label lists, fed hostile parameters.

Every case must get a 4xx with a message, leave the server alive, and write nothing (the datastore,
the session store and the server's temporary folder are compared with their state before the case;
files named with ESCAPE are looked for where a path trick would put them). The last test prints how
many cases were tried and how many got a 5xx (must be 0). Cases are derandomized: CI is reproducible.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import string
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app_helpers import SAMPLE_DIR, bbox, organ_mask, write_dicom_series
from medsam_http.server import LabelServer

MAX_UPLOAD_MB = 2
ESCAPE = "fuzz-escape"
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _shape(name: str) -> tuple[int, int, int]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(SAMPLE_DIR / f"{name}.nii.gz"))
    reader.ReadImageInformation()
    return reader.GetSize()  # (x, y, slices)


IMAGES = {name: _shape(name) for name in ("ct_3mm", "ct_512", "mr_3mm")}
LIVER_24 = [*bbox(organ_mask("ct_3mm", "liver")[24]), 24]


# ---- the server, and what every case must leave as it was --------------------------------------


class Tally:
    """Cases sent, answers by status, and every 5xx or dead server (must stay empty)."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []

    @property
    def tried(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        return (f"hardening fuzz: {self.tried} cases tried, {len(self.failures)} with a 5xx or a dead server; "
                f"answers by status: {dict(sorted(self.statuses.items()))}")


TALLY = Tally()


class Fuzz:
    """Sends one case and checks it: a 4xx with a message, the server alive, nothing written."""

    def __init__(self, server: LabelServer, workdir: Path) -> None:
        self.server = server
        self.watched = [workdir / "studies", workdir / "sessions", workdir / "tmp"]
        self.workdir = workdir
        self.before = self.state()

    def state(self) -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in self.watched if root.exists()
                for p in sorted(root.rglob("*"))}

    def escaped(self) -> list[Path]:
        """Files named ESCAPE where a path id would put them: /, the temporary folder, beside or in
        the server's folder."""
        near = [Path("/"), Path(tempfile.gettempdir()), self.workdir.parent]
        return [p for root in near for p in root.glob(f"*{ESCAPE}*")] + list(self.workdir.rglob(f"*{ESCAPE}*"))

    def send(self, method: str, path: str, raw_query: str = "", statuses: tuple[int, ...] = (), **kwargs) -> requests.Response:
        url = f"{self.server.url}{path}" + (f"?{raw_query}" if raw_query else "")
        response = requests.request(method, url, timeout=120, **kwargs)
        TALLY.statuses[response.status_code] += 1
        case = f"{method} {path} {raw_query} {kwargs.get('params', '')} -> {response.status_code} {response.text[:300]}"
        if response.status_code >= 500 or not self.server.alive():
            TALLY.failures.append(case)
        assert self.server.alive(), case
        assert 400 <= response.status_code < 500, case
        if statuses:
            assert response.status_code in statuses, case
        if method != "HEAD":
            detail = response.json().get("detail") if "json" in response.headers.get("content-type", "") else response.text
            assert detail, case
        self.assert_nothing_written(case)
        return response

    def assert_nothing_written(self, case: str) -> None:
        deadline = time.monotonic() + 5  # an infer upload's temporary is removed just after the reply
        while (state := self.state()) != self.before and time.monotonic() < deadline:
            time.sleep(0.1)
        changed = {k: v for k, v in state.items() if self.before.get(k) != v}
        gone = sorted(set(self.before) - set(state))
        assert not changed and not gone, f"{case}\nwritten: {changed}\nremoved: {gone}"
        assert self.escaped() == [], case


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> LabelServer:
    """One server for this module, with a 2 MB upload limit and its temporary files in a folder of
    its own (named `server` so a failing test gets its log)."""
    workdir = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(SAMPLE_DIR, workdir / "studies")
    (workdir / "tmp").mkdir()
    env = {"MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"), "TMPDIR": str(workdir / "tmp")}
    srv = LabelServer(workdir / "studies", workdir / "server.log", env=env,
                      conf={"prefetch_slices": "0", "max_upload_mb": str(MAX_UPLOAD_MB)}).start()
    srv.workdir = workdir  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fuzz(server) -> Fuzz:
    # Warm up what a good request loads (model, image, one slice's embedding), so bad cases that
    # carry a good box cost no encoding; then freeze the state every case is compared with.
    reply = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm", "output": "json"},
                          files={"params": (None, json.dumps({"boxes": [LIVER_24]}))}, timeout=300)
    assert reply.status_code == 200, reply.text
    time.sleep(1)
    return Fuzz(server, server.workdir)


# ---- strategies ------------------------------------------------------------------------------

JUNK = st.one_of(st.text(max_size=6), st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just("5"), st.just(""))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE = st.one_of(st.integers(10**9, 10**30), st.floats(1e9, 1e308))


@st.composite
def good_box(draw, shape: tuple[int, int, int]) -> list:
    x, y, z = shape
    x0, y0 = draw(st.integers(0, x - 3)), draw(st.integers(0, y - 3))
    return [x0, y0, draw(st.integers(x0 + 2, x - 1)), draw(st.integers(y0 + 2, y - 1)), draw(st.integers(0, z - 1))]


@st.composite
def bad_box(draw, shape: tuple[int, int, int]) -> list:
    """[x0, y0, x1, y1, k] with at least one defect that makes it no box on the image."""
    x, y, z = shape
    box = draw(good_box(shape))
    defect = draw(st.sampled_from(["outside", "zero-area", "non-finite", "not-a-number", "huge", "slice", "length",
                                   "inverted-outside"]))
    axis = draw(st.sampled_from([0, 1]))  # x or y
    size = (x, y)[axis]
    if defect in ("outside", "inverted-outside"):  # wholly beyond one edge
        gap, width = draw(st.integers(0, 10**6)), draw(st.integers(1, 100))
        low, high = (size + gap, size + gap + width) if draw(st.booleans()) else (-gap - width - 1, -gap - 1)
        box[axis], box[axis + 2] = (high, low) if defect == "inverted-outside" else (low, high)
    elif defect == "zero-area":
        box[axis + 2] = box[axis]
    elif defect == "non-finite":
        box[draw(st.integers(0, 4))] = draw(NON_FINITE)
    elif defect == "not-a-number":
        box[draw(st.integers(0, 4))] = draw(JUNK)
    elif defect == "huge":
        value = draw(HUGE) * draw(st.sampled_from([1, -1]))
        box[axis], box[axis + 2] = value, value + (1 if value > 0 else -1) * draw(st.integers(1, 10))
    elif defect == "slice":
        box[4] = draw(st.one_of(st.integers(z, z + 10**6), st.integers(-10**6, -1), st.just(1.5), HUGE))
    else:
        n = draw(st.sampled_from([0, 1, 2, 3, 4, 6, 7]))
        box = (box + [1, 2, 3])[:n]
    return box


# Option values the app takes (names as written in the README: presets and their spellings, DICOM
# modality codes and aliases, the served model); a fuzzed value equal to one is no bad input.
ACCEPTED_WINDOWS = {"auto", "soft", "abdomen", "soft_tissue", "lung", "brain", "bone"}
ACCEPTED_MODALITIES = {"CT", "MR", "XR", "US", "RGB", "OTHER", "MRI", "CR", "DX", "DR", "XRAY", "X-RAY", "MG",
                       "ULTRASOUND", "PT", "NM", "OT"}


def _accepted_option(option: str, value: str) -> bool:
    if option == "window":
        return value.strip().lower().replace(" ", "_").replace("-", "_") in ACCEPTED_WINDOWS
    if option == "modality":
        return value.strip().upper() in ACCEPTED_MODALITIES
    return option == "model" and value == "medsam-lite"


@st.composite
def bad_prompt(draw, shape: tuple[int, int, int]) -> dict:
    """An infer request's prompt part (boxes, Slicer's roi, OHIF's clicks) with a defect."""
    x, y, z = shape
    kind = draw(st.sampled_from(["boxes", "roi", "clicks", "container"] + ["option"] * (shape == IMAGES["ct_3mm"])))
    if kind == "boxes":  # a bad box, alone or after a good one on ct_3mm's warm slice (no encoding)
        boxes = draw(st.sampled_from([[], [LIVER_24]])) if shape == IMAGES["ct_3mm"] else []
        return {"boxes": boxes + [draw(bad_box(shape))]}
    if kind == "roi":  # [i0, i1, j0, j1, k0, k1]
        x0, y0, x1, y1, k = draw(good_box(shape))
        roi = [x0, x1, y0, y1, k, k]
        defect = draw(st.sampled_from(["outside", "zero-area", "slice", "non-finite", "not-a-number", "length"]))
        if defect == "outside":
            roi[0], roi[1] = x + draw(st.integers(0, 1000)), x + 1001 + draw(st.integers(0, 1000))
        elif defect == "zero-area":
            roi[3] = roi[2]
        elif defect == "slice":
            roi[4] = roi[5] = z + draw(st.integers(0, 10**6))
        elif defect == "non-finite":
            roi[draw(st.integers(0, 5))] = draw(NON_FINITE)
        elif defect == "not-a-number":
            roi[draw(st.integers(0, 5))] = draw(JUNK)
        else:
            roi = roi[: draw(st.sampled_from([0, 1, 2, 3, 5]))]
        return {"roi": roi}
    if kind == "clicks":  # OHIF: foreground [[i, j, k], ...]
        k = draw(st.integers(0, z - 1))
        defect = draw(st.sampled_from(["single", "off-image", "slice", "no-slice", "junk"]))
        if defect == "single":
            return {"foreground": [[draw(st.integers(0, x - 1)), draw(st.integers(0, y - 1)), k]]}
        if defect == "off-image":
            far = x + draw(st.integers(0, 10**6))
            return {"foreground": [[far, draw(st.integers(0, y - 1)), k], [far + 5, draw(st.integers(0, y - 1)), k]]}
        if defect == "slice":
            bad_k = draw(st.one_of(st.integers(z, 10**6), st.integers(-10**6, -1)))
            return {"foreground": [[10, 10, bad_k], [40, 40, bad_k]]}
        if defect == "no-slice":
            return {"foreground": [[10, 10], [40, 40]]}
        return {"foreground": [[draw(JUNK), 10, k], [40, 40, k]]}
    if kind == "container":
        key = draw(st.sampled_from(["boxes", "roi", "foreground"]))
        return {key: draw(st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                         max_size=2), st.just([])))}
    option, values = draw(st.sampled_from([
        ("window", st.text(alphabet=string.ascii_letters + "-_ ", min_size=1, max_size=10)),
        ("modality", st.text(alphabet=string.ascii_lowercase + "#-", min_size=1, max_size=6)),
        ("result_extension", st.sampled_from([".png", ".dcm", ".jpg", ".nii.gz.png", "../x.nii.gz", "nii.zip"])),
        ("model", st.text(alphabet=string.ascii_lowercase + "-/.", min_size=1, max_size=12)),
    ]))
    value = draw(values.filter(lambda v: not _accepted_option(option, v)))
    return {"boxes": [LIVER_24], option: value}


ID_PREFIXES = ["../", "../../", "..%2F", "%2e%2e%2f", "/", "//", "..\\", "./", "~/", "file://", "%00", "\x00"]
ID_TARGETS = ["etc/passwd", "etc/hostname", "ct_3mm", "ct_3mm.nii.gz", "labels/final/ct_3mm", "proc/self/environ",
              "..", ".", str(SAMPLE_DIR / "ct_3mm.nii.gz"), str(SAMPLE_DIR / "ct_3mm"), ESCAPE]
PATH_IDS = st.builds(lambda a, b: a + b, st.sampled_from(ID_PREFIXES), st.sampled_from(ID_TARGETS))
# Ids that hold a path separator or NUL, or are `.`/`..`: no file name is like that, so each must be
# refused (apps/medsam/lib/datastore/ids.py). `..` inside a name (`a..b`) is no path.
UNSAFE_IDS = st.one_of(PATH_IDS.filter(lambda s: any(c in s for c in ("/", "\\", "\x00")) or s in (".", "..")),
                       st.builds(lambda a, sep, b: a + sep + b, st.text(max_size=8), st.sampled_from(["/", "\\", "\x00"]),
                                 st.text(max_size=8)),
                       st.sampled_from([".", ".."]))
UNKNOWN_IDS = st.one_of(PATH_IDS, UNSAFE_IDS, st.text(max_size=30)).filter(lambda s: s not in IMAGES)
# File names as hospital exports write them: each is a valid id, so one the datastore does not list
# is unknown (404), not refused for its characters.
REAL_NAMES = st.text(alphabet=string.ascii_letters + string.digits + " ,()+-_&'%#;=[]{}~!@$^.äöüßéñçøÅ患者名",
                     min_size=1, max_size=40).filter(lambda s: s not in IMAGES and s not in (".", ".."))


# ---- files -----------------------------------------------------------------------------------


def _encode(image: sitk.Image, name: str, compress: bool = True) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        sitk.WriteImage(image, str(path), compress)
        return path.read_bytes()


def _small_image() -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    image.SetSpacing((1.5, 1.5, 3.0))
    return image


def _liver(dtype=np.uint8) -> np.ndarray:
    return organ_mask("ct_3mm", "liver").astype(dtype)


CT_3MM = sitk.ReadImage(str(SAMPLE_DIR / "ct_3mm.nii.gz"))


def _label(array: np.ndarray, is_vector: bool = False) -> sitk.Image:
    """A label array on ct_3mm's grid (as far as its size and dimension allow)."""
    label = sitk.GetImageFromArray(array, isVector=is_vector)
    if label.GetDimension() == 3:
        label.SetDirection(CT_3MM.GetDirection())
    label.SetSpacing(CT_3MM.GetSpacing()[: label.GetDimension()])
    label.SetOrigin(CT_3MM.GetOrigin()[: label.GetDimension()])
    return label


def _nifti_header_lie(kind: str) -> bytes:
    """A small NIfTI whose header lies: billions of voxels, a negative or zero size, an unknown
    data type, data far beyond the end of the file."""
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4))
    raw = bytearray(image.to_bytes())
    if kind == "huge":
        raw[40:56] = np.array([3, 40000, 40000, 40000, 1, 1, 1, 1], dtype="<i2").tobytes()
    elif kind == "negative":
        raw[42:44] = np.array([-4], dtype="<i2").tobytes()
    elif kind == "zero":
        raw[42:44] = np.array([0], dtype="<i2").tobytes()
    elif kind == "dtype":
        raw[70:72] = np.array([1234], dtype="<i2").tobytes()
    else:  # vox_offset beyond the file
        raw[108:112] = np.array([1e9], dtype="<f4").tobytes()
    return gzip.compress(bytes(raw))


GOOD_IMAGES = {name: _encode(_small_image(), name) for name in ("small.nii.gz", "small.nii", "small.nrrd", "small.mha")}
GOOD_IMAGES["small.png"] = _encode(sitk.GetImageFromArray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 251), "small.png")
GOOD_LABELS = {name: _encode(_label(_liver()), name) for name in ("ct_3mm.nii.gz", "ct_3mm.nii", "ct_3mm.nrrd")}


@st.composite
def corrupt_file(draw, good: dict[str, bytes]) -> tuple[str, bytes]:
    """(file name, bytes) of a file that is not a whole image: junk, a good file cut short, or a
    NIfTI whose header lies."""
    kind = draw(st.sampled_from(["junk", "truncated", "truncated", "header"]))
    if kind == "junk":
        ext = draw(st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".dcm", ".exe", ""]))
        return f"junk{ext}", draw(st.binary(max_size=2048))
    if kind == "truncated":
        name = draw(st.sampled_from(sorted(good)))
        data = good[name]
        return name, data[: draw(st.integers(0, len(data) - 1))]
    return "lie.nii.gz", _nifti_header_lie(draw(st.sampled_from(["huge", "negative", "zero", "dtype", "offset"])))


# ---- the cases ------------------------------------------------------------------------------


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_infer_rejects_bad_prompts(fuzz, data):
    image = data.draw(st.sampled_from(sorted(IMAGES)))
    params = data.draw(bad_prompt(IMAGES[image]))
    fuzz.send("POST", "/infer/medsam", params={"image": image, "output": "json"}, statuses=(400,),
              files={"params": (None, json.dumps(params))})  # NaN/Infinity as Python's json writes them


@settings(max_examples=60, **SETTINGS)
@given(image=UNKNOWN_IDS, unsafe=UNSAFE_IDS)
def test_unknown_and_path_ids_are_refused_on_every_route(fuzz, image, unsafe):
    """Ids that are no datastore id, sent as they are and URL-encoded once more (`%2F` reaching the
    app as text): 400 or 404 on every route that takes an image, label, tag or session id."""
    label = GOOD_LABELS["ct_3mm.nii.gz"]
    box = {"params": (None, json.dumps({"boxes": [LIVER_24]}))}
    for value in (image, quote(image, safe="")):
        q = {"image": value}
        fuzz.send("POST", "/infer/medsam", params={**q, "output": "json"}, files=box, statuses=(400, 404))
        fuzz.send("POST", "/infer/medsam", params={"session_id": value or "x"}, files=box, statuses=(404,))
        fuzz.send("GET", "/datastore/image", params=q, statuses=(400, 404, 422))
        fuzz.send("HEAD", "/datastore/image", params=q)
        fuzz.send("GET", "/datastore/image/info", params=q, statuses=(400, 404, 422))
        fuzz.send("PUT", "/datastore/image/info", params=q, data={"info": "{}"}, statuses=(400, 404, 422))
        fuzz.send("DELETE", "/datastore/image", params={"id": value}, statuses=(400, 404, 422))
        fuzz.send("GET", "/datastore/label", params={"label": value, "tag": "final"}, statuses=(400, 404, 422))
        fuzz.send("GET", "/datastore/label/info", params={"label": value, "tag": "final"}, statuses=(400, 404, 422))
        fuzz.send("DELETE", "/datastore/label", params={"id": value, "tag": "final"}, statuses=(400, 404, 422))
        fuzz.send("PUT", "/datastore/label", params=q, files={"label": ("ct_3mm.nii.gz", label)}, statuses=(400, 404, 422))
        segment = quote(value, safe="") if value not in (".", "..") else value.replace(".", "%2E")  # else the client drops it
        fuzz.send("GET", f"/session/{segment}", statuses=(400, 404, 405))
        fuzz.send("DELETE", f"/session/{segment}", statuses=(400, 404, 405))
    # Unsafe ids on the routes that write: refused before anything is stored.
    fuzz.send("PUT", "/datastore/image", params={"image": unsafe}, statuses=(400,),
              files={"file": ("small.nii.gz", GOOD_IMAGES["small.nii.gz"])})
    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm", "tag": unsafe}, statuses=(400,),
              files={"label": ("ct_3mm.nii.gz", label)})
    # The raw query: the server decodes %2F and %2e itself, and the id is no plain name.
    fuzz.send("POST", "/infer/medsam", raw_query=f"image=..%2F..%2F{quote(ESCAPE)}&output=json", files=box,
              statuses=(400,))


@settings(max_examples=60, **SETTINGS)
@given(name=REAL_NAMES)
def test_real_names_not_in_the_datastore_are_unknown_not_refused(fuzz, name):
    """Spaces, commas, parentheses, `+`, `%`, non-ASCII...: 404 on every per-id route, as for any id
    the datastore does not list (the app used to answer 400 "not a valid id" to such names, though
    GET /datastore/ lists them when they are there: tests/test_hardening_names.py)."""
    box = {"params": (None, json.dumps({"boxes": [LIVER_24]}))}
    q, labelled = {"image": name}, {"label": name, "tag": "final"}
    fuzz.send("POST", "/infer/medsam", params={**q, "output": "json"}, files=box, statuses=(404,))
    fuzz.send("GET", "/datastore/image", params=q, statuses=(404,))
    fuzz.send("HEAD", "/datastore/image", params=q, statuses=(404,))
    fuzz.send("GET", "/datastore/image/info", params=q, statuses=(404,))
    fuzz.send("PUT", "/datastore/image/info", params=q, data={"info": "{}"}, statuses=(404,))
    fuzz.send("DELETE", "/datastore/image", params={"id": name}, statuses=(404,))
    fuzz.send("PUT", "/datastore/label", params=q, files={"label": ("ct_3mm.nii.gz", GOOD_LABELS["ct_3mm.nii.gz"])},
              statuses=(404,))
    for method, path in (("GET", "/datastore/label"), ("GET", "/datastore/label/info"), ("DELETE", "/datastore/label")):
        fuzz.send(method, path, params=labelled if method == "GET" else {"id": name, "tag": "final"}, statuses=(404,))
    fuzz.send("GET", "/datastore/label", params={"label": "ct_3mm", "tag": name}, statuses=(404,))  # a tag never used


@settings(max_examples=150, **SETTINGS)
@given(image=corrupt_file(GOOD_IMAGES), label=corrupt_file(GOOD_LABELS))
def test_corrupt_and_truncated_uploads_are_refused(fuzz, image, label):
    name, data = image
    box = json.dumps({"boxes": [[1, 1, 4, 4, 0]]})
    fuzz.send("PUT", "/datastore/image", params={"image": "upload"}, files={"file": (name, data)}, statuses=(400,))
    fuzz.send("PUT", "/session/", files={"files": (name, data)}, statuses=(400,))
    fuzz.send("POST", "/infer/medsam", params={"output": "json"}, statuses=(400,),
              files={"file": (name, data), "params": (None, box)})
    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm"}, files={"label": label}, statuses=(400,))


def _dicom_series() -> list[tuple[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(sitk.ReadImage(str(SAMPLE_DIR / "mr_3mm.nii.gz"))[:, :, :4], f"{tmp}/mr.nii.gz")
        return [(p.name, p.read_bytes()) for p in write_dicom_series(Path(f"{tmp}/mr.nii.gz"), Path(tmp) / "dcm")]


DICOM_SERIES = _dicom_series()


@settings(max_examples=30, **SETTINGS)
@given(which=st.integers(0, len(DICOM_SERIES) - 1), cut=st.floats(0, 0.999), junk=st.binary(max_size=64))
def test_dicom_series_with_a_broken_slice_is_refused(fuzz, which, cut, junk):
    """A session from DICOM slices, one of them cut short (or replaced by junk): GDCM drops it and
    reads the rest; the app refuses the whole upload."""
    files = list(DICOM_SERIES)
    name, data = files[which]
    files[which] = (name, data[: int(cut * len(data))] if cut > 0.05 else junk)
    fuzz.send("PUT", "/session/", files=[("files", f) for f in files], statuses=(400,))


def _bad_label(defect: str, draw) -> tuple[str, bytes]:
    liver = _liver()
    if defect == "size":
        dz, dy, dx = draw(st.tuples(*[st.integers(-3, 3)] * 3).filter(any))
        z, y, x = liver.shape
        return "l.nii.gz", _encode(_label(np.ones((z + dz, y + dy, x + dx), np.uint8)), "l.nii.gz")
    if defect in ("spacing", "origin", "direction"):
        label = _label(liver)
        if defect == "spacing":
            spacing = list(label.GetSpacing())
            spacing[draw(st.integers(0, 2))] *= draw(st.sampled_from([0.5, 0.9, 1.1, 2.0]))
            label.SetSpacing(spacing)
        elif defect == "origin":
            origin = list(label.GetOrigin())
            origin[draw(st.integers(0, 2))] += draw(st.sampled_from([-30.0, -1.5, 1.5, 1000.0]))
            label.SetOrigin(origin)
        else:
            axis = draw(st.integers(0, 2))
            direction = list(label.GetDirection())
            direction[axis * 4] *= -1
            label.SetDirection(direction)
        return "l.nrrd", _encode(label, "l.nrrd")
    if defect == "fraction":
        return "l.nii.gz", _encode(_label(liver * draw(st.sampled_from([0.5, 1.25, 2.7]))), "l.nii.gz")
    if defect == "negative":
        return "l.nii.gz", _encode(_label(liver.astype(np.int16) * -draw(st.integers(1, 1000))), "l.nii.gz")
    if defect == "too-big":
        return "l.nii.gz", _encode(_label(liver.astype(np.int32) * draw(st.integers(65536, 2**31 - 1))), "l.nii.gz")
    if defect == "nan":  # SimpleITK reads NaN in a NIfTI as 0; the app checks with nibabel
        values = liver.astype(np.float32)
        values[tuple(draw(st.integers(0, n - 1)) for n in values.shape)] = draw(NON_FINITE)
        name = draw(st.sampled_from(["l.nii.gz", "l.nii", "l.nrrd"]))
        return name, _encode(_label(values), name)
    if defect == "vector":
        return "l.nrrd", _encode(_label(np.stack([liver] * 3, axis=-1), is_vector=True), "l.nrrd")
    if defect == "2d":
        return "l.nii.gz", _encode(_label(liver[draw(st.integers(0, liver.shape[0] - 1))]), "l.nii.gz")
    if defect == "empty":
        return "l.nii.gz", _encode(_label(np.zeros_like(liver)), "l.nii.gz")
    n = liver.size + draw(st.sampled_from([-1, 1, -liver.size // 2, 100]))
    return "label.bin", bytes(n)  # OHIF's raw voxels, the wrong count


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_labels_of_wrong_shape_type_or_geometry_are_refused(fuzz, data):
    defect = data.draw(st.sampled_from(["size", "spacing", "origin", "direction", "fraction", "negative", "too-big",
                                        "nan", "vector", "2d", "empty", "bin"]))
    name, payload = _bad_label(defect, data.draw)
    tag = data.draw(st.sampled_from(["final", "original", ""]))
    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm", **({"tag": tag} if tag else {})},
              files={"label": (name, payload)}, statuses=(400,))


def _not_a_json_object(text: str) -> bool:
    try:
        return not isinstance(json.loads(text), dict)
    except ValueError:
        return True


MALFORMED_JSON = st.one_of(st.text(max_size=40), st.sampled_from(['{"boxes": [1, 2', "[1, 2]", "null", '"{}"', "{'a': 1}",
                                                                   "{,}", "NaN", "1e999", '{"a": }'])
                           ).filter(lambda t: t.strip() not in ("", "null") and _not_a_json_object(t))


@settings(max_examples=100, **SETTINGS)
@given(text=MALFORMED_JSON, body=st.binary(max_size=300), boundary=st.text(string.ascii_letters, max_size=12),
       content_type=st.sampled_from(["multipart/form-data; boundary={b}", "multipart/form-data", "application/json",
                                     "text/plain", "application/x-www-form-urlencoded", "multipart/mixed; boundary={b}"]))
def test_malformed_json_and_multipart_are_refused(fuzz, text, body, boundary, content_type):
    label = GOOD_LABELS["ct_3mm.nii.gz"]
    fuzz.send("POST", "/infer/medsam", params={"image": "ct_3mm"}, files={"params": (None, text)}, statuses=(400,))
    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm"}, statuses=(400,),
              files={"label": ("ct_3mm.nii.gz", label), "params": (None, text)})
    fuzz.send("PUT", "/datastore/image", params={"image": "fresh"}, statuses=(400,),
              files={"file": ("small.nii.gz", GOOD_IMAGES["small.nii.gz"]), "params": (None, text)})
    fuzz.send("PUT", "/datastore/image/info", params={"image": "ct_3mm"}, data={"info": text}, statuses=(400,))
    for route in ("/activelearning/random", "/train/medsam", "/scoring/draft_dice"):
        fuzz.send("POST", route, data=text.encode(), headers={"Content-Type": "application/json"}, statuses=(422,))
    headers = {"Content-Type": content_type.format(b=boundary)}
    # A broken body: the required file is missing or unreadable, the params field absent or junk.
    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm"}, data=body, headers=headers)
    fuzz.send("PUT", "/datastore/image", data=body, headers=headers)
    fuzz.send("PUT", "/session/", data=body, headers=headers)
    fuzz.send("POST", "/infer/medsam", params={"image": "ct_3mm"}, data=body, headers=headers)


def test_uploads_over_the_limit_get_413(fuzz):
    big = b"\x00" * ((MAX_UPLOAD_MB << 20) + 1)
    upload_routes = [("PUT", "/datastore/image", {}, "file"), ("PUT", "/datastore/label", {"image": "ct_3mm"}, "label"),
                     ("PUT", "/session/", {}, "files"), ("POST", "/infer/medsam", {"image": "ct_3mm"}, "file"),
                     ("PUT", "/model/medsam", {}, "file")]
    for method, path, query, field in upload_routes:
        fuzz.send(method, path, params=query, files={field: ("big.nii.gz", big)}, statuses=(413,))
    fuzz.send("POST", "/activelearning/random", json={"pad": "x" * (MAX_UPLOAD_MB << 20)}, statuses=(413,))
    boundary = "fuzzboundary"

    def streamed():  # chunked: no Content-Length, counted as it arrives
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n\r\n').encode()
        for _ in range(MAX_UPLOAD_MB * 8 + 1):
            yield b"\x00" * (128 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    fuzz.send("PUT", "/datastore/label", params={"image": "ct_3mm"}, data=streamed(), statuses=(413,),
              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


# Route parameters: no value here is a name, number, boolean or choice any route takes.
HOSTILE = st.one_of(PATH_IDS, UNSAFE_IDS, st.text(min_size=1, max_size=20).map(lambda s: s + "/%")).filter(
    lambda s: s.strip("/") not in ("", ".", "..", "medsam", "random", "draft_dice") and s not in IMAGES)


def _openapi_calls(url: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(method, path, path parameters, query parameters) of every route the server lists that
    takes a client-given value (routes without one answer 200 to anything)."""
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    calls = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            params = [p for p in op.get("parameters", []) if p["name"] != "token"]
            if params:
                calls.append((method.upper(), path, [p["name"] for p in params if p["in"] == "path"],
                              [p["name"] for p in params if p["in"] == "query"]))
    return calls


def test_every_listed_route_refuses_hostile_parameters(fuzz):
    calls = _openapi_calls(fuzz.server.url)
    assert len(calls) >= 25, calls

    @settings(max_examples=10, **SETTINGS)
    @given(values=st.lists(HOSTILE, min_size=4, max_size=4))
    def one_route(values, method, path, path_params, query_params):
        url_path = path
        for name, value in zip(path_params, values):
            url_path = url_path.replace("{" + name + "}", quote(value, safe=""))
        query = dict(zip(query_params, values[len(path_params):] + values))
        fuzz.send(method, url_path, params=query)

    for method, path, path_params, query_params in calls:
        one_route(method=method, path=path, path_params=path_params, query_params=query_params)


def test_zz_no_server_errors_in_all_cases(request):
    """Runs last: the count of cases and of 5xx answers or crashes (0), printed with or without -s."""
    summary = TALLY.summary()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(summary)
    print(summary)
    request.node.user_properties.append(("fuzz_summary", summary))
    if TALLY.tried == 0:
        pytest.skip("run with the fuzz tests above it")
    assert TALLY.tried > 1000, summary
    assert TALLY.failures == [], summary + "\n" + "\n".join(TALLY.failures[:20])
