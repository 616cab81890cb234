"""Token checking for MONAI Label's auth mode (MONAI_LABEL_AUTH_ENABLE=true), as a dependency override.

MONAI Label 0.8.5 (monailabel/endpoints/user/auth.py `from_token`) calls `jwt.decode` without
`algorithms`, which PyJWT 2 refuses for every token: with auth on, even a valid token got a 401.
It also fetches the realm's public key with a blocking request inside its `async` dependency, and
caches only successes: an identity provider that hangs stalled every request, one at a time.
This app overrides MONAI Label's `get_current_user` dependency (FastAPI's `dependency_overrides`,
so every route that uses MONAI Label's `RBAC`, ours included, gets it) with the same check done
right: the realm's RSA public key, an RS* signature, an unexpired token (`exp` required), and the
user and roles from the claims MONAI Label's settings name.

The key (`RealmKey`) is fetched off the event loop, by one request at a time whatever the number
of clients waiting, each attempt bounded by MONAI_LABEL_AUTH_TIMEOUT, at most `ATTEMPTS` times; it
is then kept for the process's life. A failure is kept `RETRY_AFTER_S` seconds (503 at once
meanwhile), then the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import jwt
import requests
from fastapi import Depends, FastAPI, HTTPException, status
from monailabel.config import settings
from monailabel.endpoints.user.auth import User, get_current_user, oauth2_scheme

logger = logging.getLogger(__name__)

# A realm (Keycloak) publishes one RSA key; only RSA signatures are accepted (never "none" or HS*,
# which would let a token be signed with the public key itself).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
ATTEMPTS = 2
RETRY_AFTER_S = 30.0


class KeyUnavailable(Exception):
    """The identity provider gave no public key (unreachable, too slow, or no usable key)."""


def fetch_public_key(realm_uri: str, timeout: float) -> str:
    """The realm's RSA public key in PEM, as Keycloak publishes it ({"public_key": base64 DER});
    up to ATTEMPTS tries of `timeout` seconds each. Blocking."""
    error: Exception | None = None
    for _ in range(ATTEMPTS):
        try:
            answer = requests.get(realm_uri, timeout=timeout)
            answer.raise_for_status()
            key = answer.json()["public_key"]
            return f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
        except requests.RequestException as exc:
            error = exc
        except (KeyError, TypeError, ValueError) as exc:  # answered, but with no key: no use trying again
            raise KeyUnavailable(f"no public_key in its answer ({exc!r})") from None
    raise KeyUnavailable(str(error))


class RealmKey:
    """The realm's public key, fetched once in a worker thread; concurrent callers await that one fetch."""

    def __init__(self, realm_uri: str, timeout: float) -> None:
        self.realm_uri, self.timeout = realm_uri, timeout
        self._key: str | None = None
        self._failure: tuple[float, str] | None = None  # (monotonic time, reason)
        self._fetch: asyncio.Future | None = None

    async def get(self) -> str:
        if self._key is not None:
            return self._key
        if self._failure and time.monotonic() - self._failure[0] < RETRY_AFTER_S:
            raise KeyUnavailable(f"{self._failure[1]} (tried {time.monotonic() - self._failure[0]:.0f} s ago)")
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(asyncio.to_thread(fetch_public_key, self.realm_uri, self.timeout))
            self._fetch.add_done_callback(self._done)
        return await asyncio.shield(self._fetch)

    def _done(self, fetch: asyncio.Future) -> None:
        self._fetch = None
        if fetch.cancelled():
            return
        if fetch.exception() is None:
            self._key, self._failure = fetch.result(), None
        else:
            self._failure = (time.monotonic(), str(fetch.exception()))
            logger.warning("identity provider %s gave no public key: %s", self.realm_uri, fetch.exception())


_realm_key: RealmKey | None = None


def _claim(payload: dict[str, Any], path: str) -> Any:
    """A claim by MONAI Label's setting syntax: "realm_access#roles" is payload["realm_access"]["roles"]."""
    value: Any = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def user_from_token(token: str, key: str) -> User:
    """The user a valid token names; jwt.InvalidTokenError for a bad, expired or forged one."""
    payload = jwt.decode(token, key, algorithms=ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    return User(username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
                email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=[str(r) for r in roles] if isinstance(roles, list) else [])


async def current_user(token: str = Depends(oauth2_scheme)) -> User:
    """MONAI Label's `get_current_user`, checked as above: 401 for a missing or invalid token,
    503 when the identity provider cannot be reached or publishes no usable RSA key."""
    unavailable = f"identity provider {settings.MONAI_LABEL_AUTH_REALM_URI} gave no public key"
    try:
        key = await _realm_key.get()  # type: ignore[union-attr]
    except KeyUnavailable as exc:
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{unavailable}: {exc}") from None
    try:
        return user_from_token(token, key)
    except (jwt.InvalidKeyError, ValueError) as exc:  # published, but not a key
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{unavailable}: {exc}") from None
    except jwt.InvalidTokenError as exc:
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail=f"Could not validate credentials: {exc}",
                            headers={"WWW-Authenticate": "Bearer"}) from None


def install(app: FastAPI) -> bool:
    """Override MONAI Label's token check in the running server's app when auth is on."""
    global _realm_key
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    _realm_key = RealmKey(settings.MONAI_LABEL_AUTH_REALM_URI, float(settings.MONAI_LABEL_AUTH_TIMEOUT))
    app.dependency_overrides[get_current_user] = current_user
    return True
