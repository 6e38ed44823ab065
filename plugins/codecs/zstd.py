"""``codec=zstd``: lossless — the update's bytes, made compressible, in one Zstandard frame.

Needs the ``zstandard`` package (``pip install 'fedplug[codecs]'``) on the
server and on every client; without it the run (or the client) stops at
start-up saying so.

The frame's content is, for every tensor of the global model in sorted name
order (Python string order), its little-endian bytes (``numel`` x element
size), concatenated:

* with ``relative: true`` (the default) XORed byte by byte with the global
  tensor's bytes: after a round of training most sign, exponent and high
  mantissa bits are unchanged, so most bytes become zero;
* then byte-shuffled (for element sizes above 1): byte 0 of every element,
  then byte 1 of every element, and so on, which puts the (now mostly zero)
  high bytes together.

The decoder undoes both, so the update arrives bit for bit.  The frame must
state its content size, which must equal the model's raw size; anything
after the frame is refused.  Settings: ``level`` (1-22, default 3) and
``relative`` (true).
"""

from __future__ import annotations

import warnings

import torch

from fedplug.hooks import hookimpl
from fedplug.wire import WireError

from fedplug_plugins.codecs._format import check_layout, flag, number

NAME = "zstd"


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise WireError("codec=zstd needs the zstandard package, which is not installed here: "
                        "pip install 'fedplug[codecs]' (or pip install zstandard) on the server and every "
                        "client, or choose another codec") from None
    return zstandard


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _shuffle(raw: torch.Tensor, size: int) -> torch.Tensor:
    return raw if size == 1 else raw.view(-1, size).t().reshape(-1)


def _unshuffle(raw: torch.Tensor, size: int) -> torch.Tensor:
    return raw.clone() if size == 1 else raw.view(size, -1).t().reshape(-1)


@hookimpl
def fedplug_encode_update(weights, reference, config):
    zstandard = _zstandard()
    level = int(number(config, "level", 3, 1, 22, NAME, open_low=False, integer=True))
    relative = flag(config, "relative", True, NAME)
    check_layout(weights, reference)
    pieces = []
    for name in sorted(reference):
        raw = _bytes_of(weights[name])
        if relative:
            raw = torch.bitwise_xor(raw, _bytes_of(reference[name]))
        pieces.append(_shuffle(raw, reference[name].element_size()))
    content = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(content.numpy())


@hookimpl
def fedplug_decode_update(data, reference, config):
    zstandard = _zstandard()
    relative = flag(config, "relative", True, NAME)
    expected = sum(t.numel() * t.element_size() for t in reference.values())
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise WireError(f"not a zstd frame: {exc}") from None
    if declared != expected:  # checked before decompressing: the frame header cannot make us allocate more
        said = "no content size" if declared == zstandard.CONTENTSIZE_UNKNOWN else f"{declared} bytes"
        raise WireError(f"the zstd frame declares {said}; an update of this model is exactly {expected} bytes")
    reader = zstandard.ZstdDecompressor().decompressobj()
    try:
        content = reader.decompress(data)
    except zstandard.ZstdError as exc:
        raise WireError(f"the zstd frame is corrupt: {exc}") from None
    if not reader.eof or len(content) != expected:
        raise WireError(f"the zstd frame holds {len(content)} bytes (complete: {reader.eof}); "
                        f"expected exactly {expected}")
    if reader.unused_data:
        raise WireError(f"{len(reader.unused_data)} bytes follow the zstd frame; send exactly one frame")
    with warnings.catch_warnings():  # read-only bytes: every tensor below is a fresh copy, never written through
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(content, dtype=torch.uint8) if expected else torch.zeros(0, dtype=torch.uint8)
    out, offset = {}, 0
    for name in sorted(reference):
        ref = reference[name]
        size, n = ref.element_size(), ref.numel() * ref.element_size()
        raw = _unshuffle(flat[offset:offset + n], size)
        offset += n
        if relative:
            raw = torch.bitwise_xor(raw, _bytes_of(ref))
        out[name] = raw.view(ref.dtype).reshape(ref.shape)
    return {name: out[name] for name in reference}
