"""Real file names: an image the datastore lists works on every route that takes its id, whatever
its name (spaces, commas, parentheses, `+`, `&`, `%`, quotes, non-ASCII); ids that are paths, and
files that link out of the datastore, are refused by the datastore itself, so every caller (the
routes, and the strategies, scoring and training that call the datastore in the server) is held
to the same rule (apps/medsam/lib/datastore/ids.py).

Stock MONAI Label takes any name (and any path); the app before this rule refused every name
outside `[A-Za-z0-9_.-]` with 400 "not a valid id" on every per-id route, though GET /datastore/
listed it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from app_helpers import REPO_ROOT, SAMPLE_DIR, bbox, organ_mask

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))
from lib.datastore.errors import InvalidId, LabelRejected  # noqa: E402
from lib.datastore.local import AtomicLocalDatastore  # noqa: E402
from medsam_http.server import LabelServer  # noqa: E402

# Names as hospital exports and users write them; each is a copy of the sample mr_3mm.
REAL_NAMES = ["patient 01", "Müller, Jürgen (2)", "ct+contrast", "患者 三", "50% dose & more", "o'brien", "a..b",
              "#1 ; =x", ".hidden"]
PATHS = ["../ct_3mm", "../../etc/hostname", "/etc/hostname", "labels/final/ct_3mm", "./ct_3mm", "..", ".",
         "..\\ct_3mm", "ct_3mm\x00", "x" * 256]
LIVER_MR = organ_mask("mr_3mm", "liver")
BOX = [*bbox(LIVER_MR[LIVER_MR.sum(axis=(1, 2)).argmax()]), int(LIVER_MR.sum(axis=(1, 2)).argmax())]


def _studies(root: Path) -> Path:
    """The sample datastore with REAL_NAMES added, and one image that links out of it."""
    studies = root / "studies"
    shutil.copytree(SAMPLE_DIR, studies, ignore=shutil.ignore_patterns("ct_512*"))
    for name in REAL_NAMES:
        shutil.copy(SAMPLE_DIR / "mr_3mm.nii.gz", studies / f"{name}.nii.gz")
    shutil.copy(SAMPLE_DIR / "mr_3mm.nii.gz", root / "outside.nii.gz")
    os.symlink(root / "outside.nii.gz", studies / "linked.nii.gz")
    return studies


def _label_bytes(tmp: Path) -> bytes:
    label = sitk.GetImageFromArray(LIVER_MR.astype(np.uint8))
    label.CopyInformation(sitk.ReadImage(str(SAMPLE_DIR / "mr_3mm.nii.gz")))
    sitk.WriteImage(label, str(tmp / "label.nii.gz"), True)
    return (tmp / "label.nii.gz").read_bytes()


# ---- the datastore, as every caller in the server uses it -------------------------------------


def test_datastore_resolves_real_names_and_refuses_paths_for_every_caller(tmp_path: Path):
    studies = _studies(tmp_path)
    store = AtomicLocalDatastore(str(studies), auto_reload=False)
    assert set(REAL_NAMES) <= set(store.list_images()) and "linked" not in store.list_images()
    for name in REAL_NAMES:
        assert Path(store.get_image_uri(name)) == (studies / f"{name}.nii.gz").resolve(), name
    label = tmp_path / "label.nii.gz"
    label.write_bytes(_label_bytes(tmp_path))
    store.save_label("patient 01", str(label), "final", {})
    assert Path(store.get_label_uri("patient 01", "final")).is_file()
    assert "patient 01" in store.get_labeled_images()

    calls = {
        "get_image_uri": lambda i: store.get_image_uri(i), "get_image_info": lambda i: store.get_image_info(i),
        "get_label_uri": lambda i: store.get_label_uri(i, "final"), "get_label_info": lambda i: store.get_label_info(i, "final"),
        "tag": lambda i: store.get_label_uri("ct_3mm", i), "add_image": lambda i: store.add_image(i, str(label), {}),
        "save_label": lambda i: store.save_label(i, str(label), "final", {}),
        "save_label tag": lambda i: store.save_label("mr_3mm", str(label), i, {}),
        "update_image_info": lambda i: store.update_image_info(i, {}), "remove_image": lambda i: store.remove_image(i),
        "update_label_info": lambda i: store.update_label_info(i, "final", {}),
    }
    before = sorted(p for p in tmp_path.rglob("*"))
    for value in PATHS:
        for what, call in calls.items():
            with pytest.raises(InvalidId):
                call(value)
                pytest.fail(f"{what}({value!r}) was not refused")
    assert sorted(p for p in tmp_path.rglob("*")) == before

    # A listed image or label whose file is replaced by a link out of the datastore: refused, and
    # left out of what training reads.
    os.replace(studies / "mr_3mm.nii.gz", tmp_path / "moved.nii.gz")
    os.symlink(tmp_path / "moved.nii.gz", studies / "mr_3mm.nii.gz")
    with pytest.raises(InvalidId, match="not inside the datastore"):
        store.get_image_uri("mr_3mm")
    assert not any("mr_3mm" in pair["image"] for pair in store.datalist())
    assert any("patient 01" in pair["image"] for pair in store.datalist())
    # A label on another grid is refused by the datastore, not only by the route; OHIF's raw voxels
    # (label.bin, x fastest) are read on the image's grid and stored as NIfTI.
    with pytest.raises(LabelRejected):
        store.save_label("ct_3mm", str(label), "final", {})
    raw = tmp_path / "label.bin"
    raw.write_bytes(LIVER_MR.astype(np.uint8).tobytes())
    store.save_label("Müller, Jürgen (2)", str(raw), "final", {})
    saved = sitk.ReadImage(store.get_label_uri("Müller, Jürgen (2)", "final"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(saved), LIVER_MR.astype(np.uint16))


# ---- the server: every route that takes an id ---------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> LabelServer:
    workdir = tmp_path_factory.mktemp("names")
    srv = LabelServer(_studies(workdir), workdir / "server.log", conf={"prefetch_slices": "0"},
                      env={"MONAI_LABEL_SESSION_PATH": str(workdir / "sessions")})
    srv.workdir = workdir  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def test_every_listed_name_works_on_every_per_id_route(server, tmp_path):
    url = server.url
    listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert set(REAL_NAMES) <= set(listed) and "linked" not in listed
    label = _label_bytes(tmp_path)
    for name in REAL_NAMES:
        image, labelled = {"image": name}, {"label": name, "tag": "final"}
        calls = [
            ("POST", "/infer/medsam", {"params": {**image, "output": "json"},
                                       "files": {"params": (None, json.dumps({"boxes": [BOX], "label": "liver"}))}}),
            ("GET", "/datastore/image", {"params": image}), ("HEAD", "/datastore/image", {"params": image}),
            ("GET", "/datastore/image/info", {"params": image}),
            ("PUT", "/datastore/image/info", {"params": image, "data": {"info": json.dumps({"note": name})}}),
            ("PUT", "/datastore/label", {"params": {**image, "tag": "draft, v(1)"},
                                         "files": {"label": ("label.nii.gz", label)}}),
            ("PUT", "/datastore/label", {"params": image, "files": {"label": ("label.nii.gz", label)}}),
            ("GET", "/datastore/label", {"params": labelled}),
            ("HEAD", "/datastore/label", {"params": {"image": name, "tag": "final"}}),
            ("GET", "/datastore/label/info", {"params": labelled}),
            ("PUT", "/datastore/label/info", {"params": labelled, "data": {"info": "{}"}}),
            ("PUT", "/datastore/updatelabelinfo", {"params": labelled, "data": {"params": "{}"}}),
            ("DELETE", "/datastore/label", {"params": {"id": name, "tag": "draft, v(1)"}}),
        ]
        for method, path, kwargs in calls:
            response = requests.request(method, f"{url}{path}", timeout=300, **kwargs)
            assert response.status_code == 200, (name, method, path, response.status_code, response.text[:300])
        assert requests.get(f"{url}/datastore/image/info", params=image, timeout=60).json()["note"] == name
        assert (server.workdir / "studies" / "labels" / "final" / f"{name}.nii.gz").is_file()
        assert not (server.workdir / "studies" / "labels" / "draft, v(1)" / f"{name}.nii.gz").exists()
    # Uploads under such names are stored under them, and removal works by name.
    upload = (SAMPLE_DIR / "mr_3mm.nii.gz").read_bytes()
    response = requests.put(f"{url}/datastore/image", params={"image": "new (upload) +1"}, timeout=120,
                            files={"file": ("x.nii.gz", upload)})
    assert response.status_code == 200 and response.json()["image"] == "new (upload) +1", response.text
    response = requests.put(f"{url}/datastore/image", files={"file": ("Scan, day 2.nii.gz", upload)}, timeout=120)
    assert response.status_code == 200 and response.json()["image"] == "Scan, day 2", response.text
    for name in ("new (upload) +1", "Scan, day 2", "patient 01"):
        assert requests.delete(f"{url}/datastore/image", params={"id": name}, timeout=60).status_code == 200
        assert not (server.workdir / "studies" / f"{name}.nii.gz").exists()


def test_paths_and_links_are_refused_on_every_route(server, tmp_path):
    url = server.url
    label, image = _label_bytes(tmp_path), (SAMPLE_DIR / "mr_3mm.nii.gz").read_bytes()
    for value in PATHS + ["linked"]:
        calls = [
            ("POST", "/infer/medsam", {"params": {"image": value, "output": "json"},
                                       "files": {"params": (None, json.dumps({"boxes": [BOX]}))}}),
            ("GET", "/datastore/image", {"params": {"image": value}}),
            ("PUT", "/datastore/image", {"params": {"image": value}, "files": {"file": ("x.nii.gz", image)}}),
        ]
        if value != "linked":  # a tag may be named so
            calls += [("PUT", "/datastore/label", {"params": {"image": "mr_3mm", "tag": value},
                                                   "files": {"label": ("l.nii.gz", label)}}),
                      ("GET", "/datastore/label", {"params": {"label": "ct_3mm", "tag": value}})]
        for method, path, kwargs in calls:
            response = requests.request(method, f"{url}{path}", timeout=120, **kwargs)
            # The link is not listed (404 where an id is looked up), and not written through (400).
            expected = 404 if value == "linked" and method != "PUT" else 400
            assert response.status_code == expected, (value, method, path, response.status_code, response.text[:200])
    assert not list(server.workdir.glob("ct_3mm*")) and not (server.workdir / "etc").exists()
