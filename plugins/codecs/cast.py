"""``codec=fp16`` and ``codec=bf16``: every floating tensor travels in a 16-bit float dtype.

The encoding is a safetensors file with the model's own tensor names: floating
tensors cast to float16 (``F16``) or bfloat16 (``BF16``), integer buffers
unchanged.  The server casts them back to the global model's dtype.  Half the
bytes of float32; the error is the cast's rounding:

* fp16: ``|decoded - w| <= 2**-11 * |w|`` (plus ``2**-25`` below float16's
  normal range, 6.1e-5); a value beyond ±65504 cannot be sent, and the client
  reports a failed round telling you to use bf16;
* bf16: ``|decoded - w| <= 2**-8 * |w|``, float32's whole range.
"""

from __future__ import annotations

import torch

from fedplug.hooks import hookimpl
from fedplug.wire import WireError

from fedplug_plugins.codecs._format import check_layout, expect, expect_names, load, save


class CastCodec:
    """The plugin object: one instance per transport dtype."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    @hookimpl
    def fedplug_encode_update(self, weights, reference):
        check_layout(weights, reference)
        out = {}
        for name, t in weights.items():
            if t.is_floating_point():
                cast = t.detach().to("cpu", self.dtype)
                if self.dtype == torch.float16 and not bool(torch.isfinite(cast).all()):
                    if bool(torch.isfinite(t).all()):
                        raise WireError(f"tensor {name!r} holds values beyond float16's range (±65504); "
                                        "use codec=bf16 (float32's range) or codec=none")
                    raise WireError(f"tensor {name!r} holds NaN or Inf values")
                out[name] = cast
            else:
                out[name] = t
        return save(out, self.name)

    @hookimpl
    def fedplug_decode_update(self, data, reference, max_bytes):
        parts = load(data, max_bytes, self.name)
        expect_names(parts, reference, self.name)
        out = {}
        for name, ref in reference.items():
            part = parts[name]
            if ref.is_floating_point():
                expect(part, name, self.dtype, tuple(ref.shape), self.name)
                out[name] = part.to(ref.dtype)
            else:
                out[name] = part  # the core checks its dtype and shape against the global model
        return out


fp16 = CastCodec("fp16", torch.float16)
bf16 = CastCodec("bf16", torch.bfloat16)
