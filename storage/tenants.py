"""Tenants and their API keys. Keys are random, shown once, and stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import ApiKey, Tenant

KEY_PREFIX = "iq_"


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
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning this key, or None.

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
        .where(ApiKey.key_hash == digest)
    ).first()
    if row is None or not hmac.compare_digest(row[0].key_hash, digest):
        return None
    return row[1]
