"""Token checking for MONAI Label's auth mode (MONAI_LABEL_AUTH_ENABLE=true), as a dependency override.

MONAI Label 0.8.5 (monailabel/endpoints/user/auth.py `from_token`) calls `jwt.decode` without
`algorithms`, which PyJWT 2 refuses for every token: with auth on, even a valid token got a 401.
This app overrides MONAI Label's `get_current_user` dependency (FastAPI's `dependency_overrides`,
so every route that uses MONAI Label's `RBAC`, ours included, gets it) with the same check done
right: the realm's RSA public key (MONAI Label's cached `get_public_key`), an RS* signature, an
unexpired token (`exp` required), and the user and roles from the claims MONAI Label's settings name.
"""

from __future__ import annotations

from typing import Any

import jwt
import requests
from fastapi import Depends, FastAPI, HTTPException, status
from monailabel.config import settings
from monailabel.endpoints.user.auth import User, get_current_user, get_public_key, oauth2_scheme

# A realm (Keycloak) publishes one RSA key; only RSA signatures are accepted (never "none" or HS*,
# which would let a token be signed with the public key itself).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


def _claim(payload: dict[str, Any], path: str) -> Any:
    """A claim by MONAI Label's setting syntax: "realm_access#roles" is payload["realm_access"]["roles"]."""
    value: Any = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def user_from_token(token: str) -> User:
    """The user a valid token names; jwt.InvalidTokenError for a bad, expired or forged one."""
    key = get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    return User(username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
                email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=[str(r) for r in roles] if isinstance(roles, list) else [])


async def current_user(token: str = Depends(oauth2_scheme)) -> User:
    """MONAI Label's `get_current_user`, checked as above: 401 for a missing or invalid token,
    503 when the identity provider cannot be reached or publishes no usable RSA key."""
    try:
        return user_from_token(token)
    except jwt.InvalidTokenError as exc:
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail=f"Could not validate credentials: {exc}",
                            headers={"WWW-Authenticate": "Bearer"}) from None
    except (requests.RequestException, KeyError, ValueError, jwt.InvalidKeyError) as exc:  # no key, or not one
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail=f"identity provider {settings.MONAI_LABEL_AUTH_REALM_URI} gave no public key: "
                                   f"{exc}") from None


def install(app: FastAPI) -> bool:
    """Override MONAI Label's token check in the running server's app when auth is on."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    app.dependency_overrides[get_current_user] = current_user
    return True
