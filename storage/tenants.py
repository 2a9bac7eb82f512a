"""Tenants and their API keys. Keys are random, shown once, and stored only as a hash.

A key reads ``iq_<12 hex>_<43 url-safe>``: the first part is a random public identifier (the
stored ``prefix``, shown by ``inferq tenant key list``), the rest a 256-bit secret of its own,
so the stored prefix gives away nothing of the secret. Keys issued before identifiers existed
(``iq_<43 url-safe>``) keep working; their rows got an identifier that is not part of the key.
A tenant may hold several keys at once, which is how a key is rotated without downtime.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage.tables import ApiKey, Tenant, utcnow

KEY_PREFIX = "iq_"
_ID_BYTES = 6  # 12 hex characters: the public identifier
# What a key looks like; anything else is refused without a database lookup.
KEY_FORMAT = re.compile(r"iq_(?:[0-9a-f]{12}_)?[A-Za-z0-9_-]{43}")


def new_prefix() -> str:
    """A fresh public key identifier: random, and no part of any secret."""
    return KEY_PREFIX + secrets.token_hex(_ID_BYTES)


def well_formed(key: str) -> bool:
    return KEY_FORMAT.fullmatch(key) is not None


def hash_key(key: str) -> str:
    """The SHA-256 hex digest: what is stored and looked up; the key is kept nowhere."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant with one API key; return the tenant and the key in clear, once."""
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    key = issue_key(session, tenant)
    return tenant, key


def issue_key(session: Session, tenant: Tenant) -> str:
    """Add a key to the tenant (its other keys stay valid); return it in clear, once."""
    prefix = new_prefix()
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=prefix))
    session.flush()
    return key


def find_tenant(session: Session, ref: str) -> Tenant:
    """The tenant named ``ref`` or with id ``ref``; LookupError if none."""
    condition = Tenant.name == ref
    if (tenant_id := _as_uuid(ref)) is not None:
        condition = or_(condition, Tenant.id == tenant_id)
    tenant = session.scalar(select(Tenant).where(condition))
    if tenant is None:
        raise LookupError(f"no tenant {ref!r}")
    return tenant


def list_keys(session: Session, tenant: Tenant) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
        )
    )


def revoke_key(session: Session, ref: str) -> ApiKey:
    """Revoke the key with id or prefix ``ref`` (again is a no-op); LookupError if none.

    API processes that cached the key go on accepting it until their cache entry expires
    (``INFERQ_AUTH_CACHE_TTL_S``).
    """
    condition = ApiKey.prefix == ref
    if (key_id := _as_uuid(ref)) is not None:
        condition = or_(condition, ApiKey.id == key_id)
    row = session.scalar(select(ApiKey).where(condition))
    if row is None:
        raise LookupError(f"no API key {ref!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning this key, or None (a revoked key finds nothing).

    The key itself is never compared: its SHA-256 digest is looked up through the unique
    index. Timing could at most tell how many leading characters of a *digest* matched a
    stored one, and a caller cannot steer a guess's digest toward a stored digest (preimage
    resistance), so nothing is learnt about a key from a near miss. The found row's digest is
    checked again in constant time (``hmac.compare_digest``), so no comparison on this path
    stops early on secret data.
    """
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row[0].key_hash, digest):
        return None
    return row[1]
