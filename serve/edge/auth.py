"""API-key check: ``Authorization: Bearer <key>``, ``X-API-Key: <key>`` or HTTP Basic with the key as the password
(or as the user name, with no password), compared in constant time.

Basic is for the trainers whose reward clients send no headers of their own (OpenRLHF's ``--reward.remote_url`` and
slime's ``--rm-url`` post with aiohttp, which turns a URL's ``user:password@`` into Basic credentials): the key goes
in the URL they are configured with, ``http://rmserve:<key>@host:8000/get_reward``.

Keys are held only as SHA-256 digests, so every comparison has the same length and timing, and a
key never appears in a log line or a repr.

Example::

    auth = ApiKeyAuth(["s3cret"])
    auth.check({"authorization": "Bearer s3cret"})   # passes; anything else raises UnauthorizedError
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from rmserve.model.errors import UnauthorizedError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeyAuth:
    def __init__(self, keys: Sequence[str]):
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeyAuth(<{len(self._digests)} keys>)"

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise ``UnauthorizedError`` unless authentication is off or the request carries a valid key."""
        if not self._digests:
            return
        token = _presented_key(headers)
        if token is None:
            raise UnauthorizedError(
                "missing API key; send 'Authorization: Bearer <key>', or put it in the URL as http://rmserve:<key>@host"
            )
        digest = _digest(token)
        valid = False
        for expected in self._digests:  # no early exit: the time does not depend on which key matched
            valid |= hmac.compare_digest(digest, expected)
        if not valid:
            raise UnauthorizedError("invalid API key")


def _presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() == "basic":
            return _basic_key(value.strip())
        return None
    return headers.get("x-api-key") or None


def _basic_key(credentials: str) -> str | None:
    """The key in Basic ``base64(user:password)``: the password, or the user name when the password is empty (a URL
    ``http://<key>@host``); None when the credentials are not of that form."""
    try:
        user, colon, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not colon:
        return None
    return password or user or None
