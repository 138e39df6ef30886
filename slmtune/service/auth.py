"""API keys: `sk-slm-<random>`, stored only as sha256 hex; a bearer key names its tenant."""

from __future__ import annotations

import hashlib
import re
import secrets

TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")  # fullmatch: `$` would accept a trailing newline


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store, tenant: str) -> str:
    """A new key for `tenant` (created if new); returns the key, which is not stored anywhere."""
    if not TENANT_PATTERN.fullmatch(tenant or ""):
        raise ValueError(f"tenant {tenant!r}: use 1-16 lowercase letters, digits or '-', starting with a "
                         "letter or digit (it becomes part of fine-tuned model names)")
    key = "sk-slm-" + secrets.token_urlsafe(32)
    store.create_key(tenant, hash_key(key))
    return key


def tenant_from_header(store, authorization: str | None):
    """The tenant of `Authorization: Bearer KEY`, or None."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    key = authorization[7:].strip()
    if not key:
        return None
    return store.tenant_for_key(hash_key(key))
