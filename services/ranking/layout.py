"""How ranking's data is laid out in Redis.

One set per user of the item ids the user has already seen, under the same root namespace
as the feature records (`infermesh seed` writes both): `<namespace>:seen:<user_id>`. The
seen filter reads it in one round trip per request (SMEMBERS or SMISMEMBER, see seen.py).
"""

from __future__ import annotations

from services.runtime.redis_keys import DEFAULT_NAMESPACE

__all__ = ["DEFAULT_NAMESPACE", "seen_key"]


def seen_key(namespace: str, user_id: str) -> str:
    return f"{namespace}:seen:{user_id}"
