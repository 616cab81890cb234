"""Access: the server started as users start it (`main.py serve`, no --host) with MONAI Label's auth
mode on, against a stand-in identity provider; and paths and uploads that stock MONAI Label 0.8.5
lets out of the datastore (each test names what stock did).

The identity provider is a loopback HTTP server serving a Keycloak-style realm JSON with an RSA
public key made here; tokens are signed here with PyJWT, as Keycloak signs them (RS256).
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from base64 import b64encode
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app_helpers import REPO_ROOT, SAMPLE_DIR, bbox, id_requests, organ_mask
from medsam_http.server import LabelServer

ROLES = {"user": ["monailabel-user"], "annotator": ["monailabel-user", "monailabel-annotator"],
         "admin": ["monailabel-user", "monailabel-annotator", "monailabel-admin"]}
MARK = "escape-mark"  # in every file name a test tries to write outside the datastore
LIVER_24 = {"boxes": [[*bbox(organ_mask("ct_3mm", "liver")[24]), 24]]}


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class IdentityProvider:
    """A loopback stand-in for Keycloak's realm endpoint: GET <realm> -> {"public_key": base64 DER},
    the DER of its own key unless `public_key` says what to publish."""

    def __init__(self, public_key: str | None = None) -> None:
        self.key = _rsa_key()
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        published = b64encode(der).decode() if public_key is None else public_key
        body = json.dumps({"realm": "medsam", "public_key": published}).encode()
        self.requests = 0

        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                provider.requests += 1
                found = self.path.rstrip("/") == "/realms/medsam"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if found else b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm_uri = f"http://127.0.0.1:{self.httpd.server_address[1]}/realms/medsam"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, role: str = "user", expires_in: float = 600, key: object | None = None,
              algorithm: str = "RS256", **claims: object) -> str:
        now = int(time.time())
        payload = {"preferred_username": f"{role}-1", "email": f"{role}@example.org", "name": role.title(),
                   "realm_access": {"roles": ROLES[role]}, "iat": now, "exp": now + int(expires_in), **claims}
        return jwt.encode(payload, key if key is not None else self.key, algorithm=algorithm)

    def stop(self) -> None:
        self.httpd.shutdown()


class ServeCommand(LabelServer):
    """`python main.py serve` as a user runs it: no --host, so the project's default bind."""

    def command(self) -> list[str]:
        command = [sys.executable, str(REPO_ROOT / "main.py"), "serve", "--studies", self.studies,
                   "--port", str(self.port)]
        for key, value in self.conf.items():
            command += ["--conf", key, str(value)]
        return command

    def start(self, timeout: float = 300.0) -> "ServeCommand":
        # With auth on, /info/ needs a token; /auth/ (MONAI Label's auth status) is public.
        self.launch(self.command(), lambda: requests.get(f"{self.url}/auth/", timeout=5).status_code == 200,
                    timeout, poll=1.0, cwd=REPO_ROOT, env={**os.environ, **self.env})
        return self


@pytest.fixture(scope="module")
def idp():
    provider = IdentityProvider()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> ServeCommand:
    """One auth-enabled server for this module (named `server` so a failing test gets its log)."""
    workdir = tmp_path_factory.mktemp("access")
    shutil.copytree(SAMPLE_DIR, workdir / "studies")
    (workdir / "tmp").mkdir()
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
           "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"), "TMPDIR": str(workdir / "tmp")}
    srv = ServeCommand(workdir / "studies", workdir / "server.log", env=env,
                       conf={"prefetch_slices": "0", "max_upload_mb": "1"})
    srv.workdir = workdir  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def _auth(idp: IdentityProvider, role: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {idp.token(role)}"}


def _escaped(server: ServeCommand) -> list[Path]:
    """Files named with MARK anywhere near the server's folders: what a path trick would have written."""
    roots = [server.workdir.parent, Path("/tmp"), server.workdir]  # type: ignore[attr-defined]
    found = [p for root in roots for p in root.glob(f"*{MARK}*")]
    return found + list(server.workdir.rglob(f"*{MARK}*"))  # type: ignore[attr-defined]


def _nifti_bytes(image: sitk.Image) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.nii.gz"
        sitk.WriteImage(image, str(path), True)
        return path.read_bytes()


def _liver_label() -> bytes:
    reference = sitk.ReadImage(str(SAMPLE_DIR / "ct_3mm.nii.gz"))
    label = sitk.GetImageFromArray(organ_mask("ct_3mm", "liver").astype(np.uint8))
    label.CopyInformation(reference)
    return _nifti_bytes(label)


# ---- bind ------------------------------------------------------------------------------------


def test_default_bind_is_loopback_only(server):
    """`main.py serve` without --host listens on 127.0.0.1 only: another local address (127.0.0.2,
    which reaches a server bound to 0.0.0.0) is refused."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()


# ---- auth --------------------------------------------------------------------------------------


def _route_calls(server) -> list[tuple[str, str]]:
    """(method, path) of every route the server lists, path parameters filled, plus routes MONAI
    Label leaves out of its schema (OHIF, the DICOM proxy, the old upload route)."""
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    calls = [(method.upper(), path.replace("{model}", "medsam").replace("{strategy}", "random")
              .replace("{method}", "draft_dice").replace("{session_id}", "0" * 8 + "-0000-0000-0000-" + "0" * 12))
             for path, ops in schema["paths"].items() for method in ops if not path.startswith("/auth")]
    return calls + [("GET", "/ohif/"), ("GET", "/proxy/dicom/qido/studies"), ("PUT", "/datastore/"),
                    ("DELETE", "/datastore/")]


def test_every_route_needs_a_token(server):
    """No token: 401 on every route but MONAI Label's /auth/ ones, the app's replaced routes included
    (they keep MONAI Label's RBAC dependency)."""
    calls = _route_calls(server)
    assert ("POST", "/infer/medsam") in calls and ("PUT", "/datastore/label") in calls and ("PUT", "/session/") in calls
    answers = {f"{m} {p}": requests.request(m, f"{server.url}{p}", timeout=30).status_code for m, p in calls}
    assert len(answers) >= 35
    assert {call: status for call, status in answers.items() if status != 401} == {}
    assert requests.get(f"{server.url}/auth/", timeout=30).json()["enabled"] is True


def test_valid_token_is_accepted_on_stock_and_app_routes(server, idp):
    """A token signed by the realm's key: 200 on MONAI Label's /info/ and on the app's /infer route.
    (Stock MONAI Label 0.8.5 answers 401 to every token under PyJWT 2: no `algorithms` given.)"""
    headers = _auth(idp, "user")
    info = requests.get(f"{server.url}/info/", headers=headers, timeout=30)
    assert info.status_code == 200, info.text
    assert info.json()["name"] == "MedSAM"
    reply = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm", "output": "json"}, headers=headers,
                          files={"params": (None, json.dumps(LIVER_24))}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["volume_ml"] > 0
    me = requests.get(f"{server.url}/auth/token/valid", headers=headers, timeout=30).json()
    assert me["username"] == "user-1" and me["roles"] == ROLES["user"]


def test_roles_are_enforced_on_app_routes(server, idp):
    """A user token may infer but not save labels (annotator) or remove images (admin)."""
    user = _auth(idp, "user")
    save = requests.put(f"{server.url}/datastore/label", params={"image": "ct_3mm"}, headers=user,
                        files={"label": ("ct_3mm.nii.gz", _liver_label())}, timeout=60)
    assert save.status_code == 403 and "monailabel-annotator" in save.json()["detail"]
    remove = requests.delete(f"{server.url}/datastore/image", params={"id": "ct_3mm"},
                             headers=_auth(idp, "annotator"), timeout=30)
    assert remove.status_code == 403
    assert (server.workdir / "studies" / "ct_3mm.nii.gz").is_file()


def _forged_tokens(idp: IdentityProvider) -> dict[str, str]:
    public_pem = idp.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    unsigned = jwt.encode({"preferred_username": "x", "realm_access": {"roles": ROLES["admin"]},
                           "exp": int(time.time()) + 600}, None, algorithm="none")
    no_exp = jwt.encode({"preferred_username": "x", "realm_access": {"roles": ROLES["admin"]}}, idp.key, algorithm="RS256")
    return {
        "expired": idp.token("admin", expires_in=-60),
        "other key": idp.token("admin", key=_rsa_key()),
        "alg none": unsigned,
        "HS256 keyed with the public key": jwt.encode({"realm_access": {"roles": ROLES["admin"]},
                                                       "exp": int(time.time()) + 600},
                                                      public_pem.decode()[:64], algorithm="HS256"),
        "no exp": no_exp,
        "tampered payload": ".".join([idp.token("user").split(".")[0],
                                      idp.token("admin").split(".")[1], idp.token("user").split(".")[2]]),
        "garbage": "not-a-token",
    }


def test_bad_tokens_get_401(server, idp):
    answers = {}
    for name, token in _forged_tokens(idp).items():
        response = requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        answers[name] = (response.status_code, response.headers.get("www-authenticate"))
    assert answers == {name: (401, "Bearer") for name in answers}
    response = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm"},
                             headers={"Authorization": f"Bearer {idp.token('user', expires_in=-5)}"},
                             files={"params": (None, json.dumps(LIVER_24))}, timeout=60)
    assert response.status_code == 401 and "expired" in response.json()["detail"].lower()


def test_realm_key_that_is_no_key_gets_503(tmp_path: Path):
    """A realm that publishes no loadable RSA key (PyJWT's InvalidKeyError, which is no
    InvalidTokenError): 503 naming the identity provider, not a 500."""
    realm = IdentityProvider(public_key=b64encode(b"not a key").decode())
    (tmp_path / "studies").mkdir()
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.realm_uri}
    try:
        with ServeCommand(tmp_path / "studies", tmp_path / "server.log", env=env, conf={"prefetch_slices": "0"}) as srv:
            response = requests.get(f"{srv.url}/info/", headers={"Authorization": f"Bearer {realm.token('user')}"},
                                    timeout=30)
            assert response.status_code == 503, response.text
            assert realm.realm_uri in response.json()["detail"]
    finally:
        realm.stop()


class HangingRealm:
    """An identity provider that accepts connections and never answers; counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.realm_uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}/realms/medsam"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_identity_provider_that_hangs_stalls_no_other_request(tmp_path: Path):
    """Stock MONAI Label (and this app before) fetched the realm's key with a blocking request in
    the async token check, on every request until one succeeded: while the provider hung, the whole
    server hung. Here the key is fetched in a worker thread, once for all waiting requests, at most
    twice (MONAI_LABEL_AUTH_TIMEOUT each), and the failure is kept for a while (503 at once)."""
    realm = HangingRealm()
    (tmp_path / "studies").mkdir()
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.realm_uri,
           "MONAI_LABEL_AUTH_TIMEOUT": "4"}
    token = {"Authorization": f"Bearer {IdentityProvider().token('user')}"}
    try:
        with ServeCommand(tmp_path / "studies", tmp_path / "server.log", env=env, conf={"prefetch_slices": "0"}) as srv:
            answers: list[tuple[int, float]] = []

            def authed() -> None:
                started = time.monotonic()
                response = requests.get(f"{srv.url}/info/", headers=token, timeout=60)
                answers.append((response.status_code, time.monotonic() - started))

            waiting = [threading.Thread(target=authed) for _ in range(6)]
            for thread in waiting:
                thread.start()
            time.sleep(1.0)
            for _ in range(3):  # meanwhile the server answers what needs no key, at once
                started = time.monotonic()
                assert requests.get(f"{srv.url}/auth/", timeout=30).status_code == 200
                assert requests.get(f"{srv.url}/info/", timeout=30).status_code == 401  # no token
                assert time.monotonic() - started < 2.0
            for thread in waiting:
                thread.join(60)
            assert [status for status, _ in answers] == [503] * 6, answers
            assert max(seconds for _, seconds in answers) < 2 * 4 + 4, answers  # two tries, not one per request
            assert len(realm.connections) <= 2, len(realm.connections)
            started = time.monotonic()  # the failure is kept: the next request does not wait
            response = requests.get(f"{srv.url}/info/", headers=token, timeout=60)
            assert response.status_code == 503 and realm.realm_uri in response.json()["detail"], response.text
            assert time.monotonic() - started < 2.0 and len(realm.connections) <= 2
    finally:
        realm.stop()


# ---- paths and uploads -------------------------------------------------------------------------


def test_image_id_that_is_a_path_reads_nothing(server, idp):
    """Stock MONAI Label reads any existing absolute path given as an image id (its /infer), and
    its DICOMweb datastore joins any id to its cache folder; here every route that takes an image
    or label id or a tag refuses one that is not a plain name, before any lookup (400)."""
    served = server.workdir / "studies" / "ct_3mm.nii.gz"
    outside = server.workdir / f"{MARK}-secret.nii.gz"
    shutil.copy(served, outside)
    ids = [str(outside), f"../{outside.name}", "/etc/hostname", "../../../../etc/hostname",
           str(served), "studies/ct_3mm", "./ct_3mm", "..", f"..\\{outside.name}"]
    calls = [call for image in ids for call in id_requests(image)]
    calls += [(m, p, {**kw, "files": {"label": ("label.nii.gz", _liver_label())}} if m == "PUT" and "files" in kw else kw)
              for m, p, kw in id_requests("ct_3mm", tag="../final") if "tag" in kw["params"]]  # a good label: the tag is wrong
    try:
        for method, path, kwargs in calls:
            response = requests.request(method, f"{server.url}{path}", headers=_auth(idp), timeout=60, **kwargs)
            case = (method, path, kwargs["params"], response.status_code, response.text[:200])
            assert response.status_code == 400, case
            assert method == "HEAD" or "is not a valid id" in response.json()["detail"], case
        # `%2F` that reaches the app as text is part of a file name, not a path: an unknown id.
        for method, path, kwargs in id_requests(f"..%2F{outside.name}"):
            response = requests.request(method, f"{server.url}{path}", headers=_auth(idp), timeout=60, **kwargs)
            assert response.status_code == 404, (method, path, response.status_code, response.text[:200])
        assert outside.read_bytes() == served.read_bytes()
    finally:
        outside.unlink()


def test_image_upload_cannot_leave_the_datastore(server, idp):
    """Stock MONAI Label's PUT /datastore/image?image=../x writes ../x.nii.gz outside the datastore."""
    image = (SAMPLE_DIR / "mr_3mm.nii.gz").read_bytes()
    for image_id in (f"../{MARK}", f"../../{MARK}", f"/tmp/{MARK}", f"sub/{MARK}", f"..\\{MARK}", "."):
        response = requests.put(f"{server.url}/datastore/image", params={"image": image_id}, headers=_auth(idp),
                                files={"file": ("x.nii.gz", image)}, timeout=60)
        assert response.status_code == 400 and "not a valid id" in response.json()["detail"], image_id
    response = requests.put(f"{server.url}/datastore/image", headers=_auth(idp), timeout=60,
                            files={"file": (f"../../{MARK}.nii.gz", image)})  # the file name is no path either
    assert response.status_code == 200 and response.json()["image"] == f"{MARK}"
    assert (server.workdir / "studies" / f"{MARK}.nii.gz").is_file()
    assert requests.delete(f"{server.url}/datastore/image", params={"id": MARK}, headers=_auth(idp),
                           timeout=30).status_code == 200
    assert _escaped(server) == []


def test_label_tag_cannot_leave_the_datastore(server, idp):
    """Stock MONAI Label's label route joins `tag` to the labels folder: ?tag=../../x writes outside."""
    for tag in (f"../../{MARK}", f"../{MARK}", f"/tmp/{MARK}", "..", f"final/../../{MARK}"):
        response = requests.put(f"{server.url}/datastore/label", params={"image": "ct_3mm", "tag": tag},
                                headers=_auth(idp), files={"label": ("ct_3mm.nii.gz", _liver_label())}, timeout=60)
        assert response.status_code == 400 and "tag" in response.json()["detail"], tag
    assert _escaped(server) == []


def test_corrupt_label_is_not_stored(server, idp):
    """Stock MONAI Label stores a corrupt NIfTI as the final label with a 200; here: 400, and the
    final label on disk is byte for byte what it was."""
    final = server.workdir / "studies" / "labels" / "final" / "ct_3mm.nii.gz"
    before = final.read_bytes()
    good = _liver_label()
    for name, data in (("garbage", b"\x00not a nifti" * 50), ("truncated", good[: len(good) // 2]),
                       ("gzip of nothing", gzip.compress(b""))):
        response = requests.put(f"{server.url}/datastore/label", params={"image": "ct_3mm"}, headers=_auth(idp),
                                files={"label": ("ct_3mm.nii.gz", data)}, timeout=60)
        assert response.status_code == 400, (name, response.text)
        assert final.read_bytes() == before, name
    stored = requests.put(f"{server.url}/datastore/label", params={"image": "ct_3mm"}, headers=_auth(idp),
                          files={"label": ("ct_3mm.nii.gz", good)}, timeout=60)
    assert stored.status_code == 200, stored.text
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(final))) > 0, organ_mask("ct_3mm", "liver"))


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else b""


def test_session_archive_cannot_leave_the_session_store(server, idp):
    """Stock MONAI Label unpacks a session's tar (`uncompress=true`) with no filter: members named
    ../x or /x, and links, land outside. Here every such archive is a 400 and nothing lands."""
    image = (SAMPLE_DIR / "mr_3mm.nii.gz").read_bytes()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr(f"../../{MARK}.nii.gz", image)
    archives = {
        "tar ../": _tar([_member(f"../../{MARK}.nii.gz", image)]),
        "tar absolute": _tar([_member(f"{server.workdir}/{MARK}.nii.gz", image)]),
        "tar symlink out": _tar([_member(f"{MARK}-link", kind=tarfile.SYMTYPE, link="/etc/hostname")]),
        "tar hardlink out": _tar([_member(f"{MARK}-hard", kind=tarfile.LNKTYPE, link="/etc/hostname")]),
        "zip ../": zipped.getvalue(),
        "not an archive": b"plain bytes" * 10,
    }
    for name, data in archives.items():
        response = requests.put(f"{server.url}/session/", params={"uncompress": "true"}, headers=_auth(idp),
                                files={"files": ("upload.tar.gz", data)}, timeout=60)
        assert response.status_code == 400, (name, response.text)
    assert _escaped(server) == []
    assert not (server.workdir / "sessions").exists() or not any((server.workdir / "sessions").iterdir())
    good = requests.put(f"{server.url}/session/", params={"uncompress": "true"}, headers=_auth(idp), timeout=60,
                        files={"files": ("mr.tar.gz", _tar([_member("case/mr_3mm.nii.gz", image)]))})
    assert good.status_code == 200, good.text
    session = good.json()["session_id"]
    assert requests.delete(f"{server.url}/session/{session}", headers=_auth(idp), timeout=30).status_code == 200


def test_url_paths_cannot_walk_up(server, idp):
    """/ohif/.. answered 500 in stock MONAI Label, and encoded `..` segments reach the OHIF, session
    and proxy routes; here they are a 400 before any route runs, and OHIF serves only its own files."""
    for path in ("/ohif/..", "/ohif/%2e%2e/%2e%2e/config.py", "/ohif/..%2F..%2F..%2Fconfig.py", "/session/..",
                 "/proxy/dicom/..%2F..%2Fsystem", "/static/%2e%2e/%2e%2e/etc/hostname", "/ohif/a%5C..%5Cb"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", path, headers=_auth(idp))
        response = connection.getresponse()
        body = response.read()
        assert response.status in (400, 404), (path, response.status, body[:200])
    ohif = requests.get(f"{server.url}/ohif/assets", headers=_auth(idp), timeout=30)
    assert ohif.status_code == 200 and "OHIF" in ohif.text  # a folder: the viewer page, not a 500


def test_uploads_are_size_limited(server, idp):
    """Bodies over --conf max_upload_mb (1 here) get a 413, announced or streamed, token or not."""
    big = b"\x00" * (1 << 20) + b"x" * 1024
    for headers in ({}, _auth(idp)):
        response = requests.put(f"{server.url}/datastore/image", headers=headers, timeout=60,
                                files={"file": ("big.nii.gz", big)})
        assert response.status_code == 413 and "Too Large" in response.text
    boundary = "medsamboundary"

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.nii.gz\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(12):
            yield b"\x00" * (128 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.put(f"{server.url}/session/", data=chunks(), timeout=60,
                            headers={**_auth(idp), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text
    assert server.alive()


# ---- other hosts -------------------------------------------------------------------------------


def _own_non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_loopback_check_on_client_addresses():
    sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))
    from lib.endpoints.guard import is_loopback

    assert all(is_loopback(a) for a in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(a) for a in ("10.0.0.5", "192.0.2.2", "::ffff:10.0.0.5", "fd00::2", "", None, "host"))


@pytest.mark.parametrize("allow_remote", [False, True], ids=["default", "allow_remote"])
def test_stock_start_server_on_all_interfaces_serves_other_hosts_only_when_allowed(tmp_path: Path, allow_remote: bool):
    """`monailabel start_server` binds 0.0.0.0 unless told --host: the app still answers 403 to a
    request from a non-loopback address, until the admin sets `--conf allow_remote true`."""
    address = _own_non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to come from")
    shutil.copytree(SAMPLE_DIR, tmp_path / "studies")
    conf = {"prefetch_slices": "0", **({"allow_remote": "true"} if allow_remote else {})}
    with LabelServer(tmp_path / "studies", tmp_path / "server.log", conf=conf, host="0.0.0.0") as srv:
        assert requests.get(f"http://127.0.0.1:{srv.port}/info/", timeout=30).status_code == 200
        remote = requests.get(f"http://{address}:{srv.port}/info/", timeout=30)
        if allow_remote:
            assert remote.status_code == 200
        else:
            assert remote.status_code == 403 and "allow_remote" in remote.json()["detail"]
            infer = requests.post(f"http://{address}:{srv.port}/infer/medsam", params={"image": "ct_3mm"}, timeout=30)
            assert infer.status_code == 403


def test_app_routes_replace_the_stock_ones_under_monai_label_api_str(monkeypatch):
    """With MONAI_LABEL_API_STR=/api, MONAI Label includes its routers under /api; the app's routes
    were put at /datastore/... beside them, and the stock ones (unchecked) stayed served at /api/...."""
    sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))
    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    import monailabel.endpoints.datastore as stock
    import monailabel.endpoints.session as stock_session
    from lib.endpoints.install import replace_all
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_API_STR", "/api")
    app = FastAPI()
    app.include_router(stock.router, prefix="/api")
    app.include_router(stock_session.router, prefix="/api")
    app.post("/reload")(lambda: {})
    replace_all(app)
    served: dict[tuple[str, str], list[str]] = {}
    for route in app.router.routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                served.setdefault((method, route.path), []).append(route.endpoint.__module__)
    assert served[("PUT", "/api/datastore/image")] == ["lib.endpoints.datastore"]
    assert served[("PUT", "/api/datastore/label")] == ["lib.endpoints.datastore"]
    assert served[("GET", "/api/session/{session_id}")] == ["lib.endpoints.session"]
    assert served[("POST", "/reload")] == ["lib.endpoints.tasks"]  # MONAI Label serves it outside the prefix
    assert not any(path.startswith(("/datastore", "/session")) for _, path in served)
    assert not any("monailabel.endpoints" in m for (method, path), modules in served.items() for m in modules
                   if path.startswith(("/api/datastore/image", "/api/datastore/label", "/api/session")))
