"""``codec=none`` (the default): the update is the plain safetensors file of the trained state.

The same bytes a protocol-version-1 client sends; every client speaks it.
"""

from __future__ import annotations

from fedplug.hooks import hookimpl
from fedplug.wire import decode_state, encode_state


@hookimpl
def fedplug_encode_update(weights):
    return encode_state(weights)


@hookimpl
def fedplug_decode_update(data, max_bytes):
    return decode_state(data, max_bytes=max_bytes)
