"""How feature data is laid out in Redis.

One key per entity per view holding its packed little-endian record, so a request for one
user and N items is a single MGET (one round trip) and the reply decodes with one
numpy.frombuffer.

Materializations. `infermesh seed` writes the reference views straight under the root
namespace (`<root>:u:<id>`, `<root>:i:<id>`, `<root>:meta`). `infermesh features ingest`
writes each new materialization of a view beside the serving one, under a versioned prefix
`<root>:mat:<view>:<n>`, then switches the view's pointer key `<root>:current:<view>` to it
with one SET. Readers put the pointer keys in the same MGET as the records, so a reply
whose pointer moved is discarded and re-read: no reader ever mixes two materializations.
"""

from __future__ import annotations

import numpy as np

from services.runtime.redis_keys import DEFAULT_NAMESPACE  # noqa: F401  (the root of every key below)

FEATURE_DIM = 32
# user: 32 float32; item: 32 float32 + category (int32) + price (float32) = 136 bytes
USER_RECORD = np.dtype([("vec", "<f4", (FEATURE_DIM,))])
ITEM_RECORD = np.dtype([("vec", "<f4", (FEATURE_DIM,)), ("category", "<i4"), ("price", "<f4")])
MODEL_INPUT_DIM = 2 * FEATURE_DIM  # the scoring model sees [user_vec, item_vec] per row


def user_key(namespace: str, user_id: str) -> str:
    return f"{namespace}:u:{user_id}"


def item_key(namespace: str, item_id: str) -> str:
    return f"{namespace}:i:{item_id}"


def meta_key(namespace: str) -> str:
    """JSON document describing a materialization; written last, so its presence means complete."""
    return f"{namespace}:meta"


def entity_key_prefix(prefix: str, view_key: str) -> str:
    """Everything before the entity id: `<prefix>:<view key>:`."""
    return f"{prefix}:{view_key}:"


def pointer_key(root: str, view: str) -> str:
    """Holds the prefix of the view's serving materialization; absent: the root itself."""
    return f"{root}:current:{view}"


def sequence_key(root: str, view: str) -> str:
    """INCR counter numbering the view's materializations."""
    return f"{root}:seq:{view}"


def materialization_prefix(root: str, view: str, number: int) -> str:
    return f"{root}:mat:{view}:{number}"


def is_versioned(root: str, prefix: str) -> bool:
    """Whether `prefix` is an ingested materialization (owned by ingest, safe to drop when replaced)."""
    return prefix.startswith(f"{root}:mat:")
