"""JSON-able values for a checkpoint's meta: config fingerprints and PRNG keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np


def fingerprint(obj) -> str:
    """A short stable hash of a config (dataclass or JSON-able value), to store in the meta
    and check with `restore(expect=...)`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_to_json(key: jax.Array) -> dict:
    """A PRNG key (typed or raw uint32) as `{"impl": name or None, "data": [ints]}`."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl, data = str(jax.random.key_impl(key)), jax.random.key_data(key)
    else:
        impl, data = None, key
    return {"impl": impl, "data": np.asarray(data).tolist()}


def key_from_json(obj: dict) -> jax.Array:
    """The key `key_to_json` described (typed when it was typed)."""
    data = jnp.asarray(obj["data"], jnp.uint32)
    return data if obj["impl"] is None else jax.random.wrap_key_data(data, impl=obj["impl"])
