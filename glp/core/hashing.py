"""Stable short hashes of JSON-able values: cache keys, plan keys, data fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json


def stable_hash(*parts: object, length: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (dataclasses allowed)."""

    def default(obj: object) -> object:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, set | frozenset):
            return sorted(obj)
        return str(obj)

    payload = json.dumps(parts, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


