"""Bearer-token authentication of the management API.

The token comes from ``BNFOLD_API_TOKEN``; without one, a token is generated on first start and
kept in the store with owner-only permissions, so restarts keep the same token.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from service.errors import Unauthorized

TOKEN_FILE = "api_token"


def load_or_create_token(store_root: Path, explicit: str | None) -> tuple[str, bool]:
    """Return ``(token, created)``; ``created`` is True when this call generated it."""
    if explicit:
        return explicit, False
    path = Path(store_root) / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token, False
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(TOKEN_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token, True


def require_token(request: Request) -> None:
    expected: str = request.app.state.api_token
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized("invalid bearer token")


Authorized = Annotated[None, Depends(require_token)]
