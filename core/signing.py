"""Standard Webhooks signatures (https://www.standardwebhooks.com), for inferq and receivers.

inferq signs every delivery with the endpoint's secret (``whsec_`` + base64 of random
bytes): ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``. A
receiver checks it, and the timestamp's freshness, before trusting the body::

    from inferq.signing import InvalidSignature, verify

    try:
        verify(secret, request.headers, raw_body)  # the exact bytes received
    except InvalidSignature:
        return 400

``webhook-id`` stays the same across retries and replays of one delivery: receivers use it
to drop duplicates. After a secret rotation, deliveries carry two signatures (new, then old)
until the old secret's grace period ends, so a receiver may switch secrets at any time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class InvalidSignature(ValueError):
    """The delivery is not authentic or not fresh; the message says which check failed."""


def new_secret() -> str:
    """A new endpoint secret: 32 random bytes, base64, with the ``whsec_`` prefix."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message at one timestamp."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def secret_hint(secret: str) -> str:
    """What lists show of a secret: enough to tell two apart, not enough to sign."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def headers(
    secret: str | Sequence[str], msg_id: str, body: bytes, now: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for sending ``body`` now (or at ``now``); several
    secrets give several space-separated signatures (during a rotation)."""
    timestamp = int(time.time()) if now is None else now
    keys = [secret] if isinstance(secret, str) else list(secret)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(key, msg_id, timestamp, body) for key in keys),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: int | None = None,
) -> None:
    """Check a received delivery: one of its signatures matches and its timestamp is fresh.

    Args:
        secret: The endpoint's ``whsec_...`` secret.
        headers: The request headers (any mapping; names are matched case-insensitively).
        body: The raw body as received, before any JSON parsing.
        tolerance_s: How far the timestamp may be from now either way; bounds replays.
        now: The current Unix time, for tests.

    Raises:
        InvalidSignature: A header is missing, the timestamp is stale, or no signature matches.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        stamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise InvalidSignature(f"missing {exc.args[0]} header") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature(f"webhook-timestamp {stamp!r} is not a Unix time") from None
    current = int(time.time()) if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise InvalidSignature(f"webhook-timestamp is more than {tolerance_s}s from now")
    expected = sign(secret, msg_id, timestamp, body).encode()
    # Several signatures, space-separated, let a sender rotate secrets without a gap.
    if not any(hmac.compare_digest(given.encode(), expected) for given in signatures.split()):
        raise InvalidSignature("no webhook-signature matches")


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
