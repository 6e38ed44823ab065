"""Update codecs: how a client's trained weights become the bytes of its ``client_update``, and back.

A codec is a plugin of the ``codec`` role (entry-point group ``fedplug.codecs``,
config group ``codec=<name>``; hooks ``fedplug_encode_update`` and
``fedplug_decode_update`` in :mod:`fedplug.hooks`).  The server's config
selects one; ``init`` announces it to every client (``init.codec``, the
codec's config with its ``name``); a client encodes each round's update with
it, relative to the round's global model, and the server decodes it relative
to the same model.  The broadcast (``request_update`` / ``stop_and_eval``)
is always the exact global model as plain safetensors, so every client starts
a round from the same weights and a delta codec has a reference both sides
hold bit for bit.

Who calls what:

* the server, at start-up: :func:`open_codec` (loads the plugin, checks its
  config with a probe round trip, so a bad ``codec.*`` value stops the run
  before round 1); then, in a worker thread for every accepted
  ``client_update``, :meth:`ActiveCodec.decode`;
* a client, on ``init``: :func:`open_codec` with ``init.codec``; after each
  round's training, in its worker thread, :meth:`ActiveCodec.encode`.

:class:`ActiveCodec` is where the contract is enforced, whatever the plugin
does: encoded bytes are at most :func:`size_bound` of the global model (the
server's upload limit), decoded bytes from a peer are refused above it, and a
decoded state must match the global model's names, shapes and dtypes exactly
and be finite (:func:`fedplug.wire.check_against_spec`).  Every failure is a
:class:`CodecError` (a :class:`~fedplug.wire.WireError`) whose message names
the codec; an update that fails to decode is rejected like any bad update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fedplug.types import StateDict
from fedplug.wire import ModelSpec, SafetensorsLayout, WireError, check_against_spec, spec_of

PLAIN_CODEC = "fedplug_plugins.codecs.none"  # the entry point of the built-in ``none`` codec

DEFAULT_CODEC = "none"


class CodecError(WireError):
    """Weights that a codec cannot encode, or peer bytes it cannot decode; the message says why."""


def size_bound(reference: Mapping[str, torch.Tensor]) -> int:
    """The most bytes an update of this model may take on the wire: its raw tensors plus header room.

    The same bound as the server's upload limit (a plain safetensors file of the
    model fits it); every codec's output must fit it too.
    """
    raw = sum(t.numel() * t.element_size() for t in reference.values())
    return raw + 64 * 1024 + 512 * len(reference)


def _probe_state() -> dict[str, torch.Tensor]:
    """A tiny model-like state (float weights, an integer buffer) for the start-up check of a codec."""
    g = torch.Generator().manual_seed(0)
    return {"probe.weight": torch.randn(4, 8, generator=g), "probe.bias": torch.zeros(4),
            "probe.num_batches_tracked": torch.tensor(3, dtype=torch.int64)}


def codec_config(value: Any) -> dict[str, Any]:
    """``init.codec`` / the ``codec`` config node as a plain dict with a ``name``; ``None`` is the default codec."""
    if value is None:
        return {"name": DEFAULT_CODEC}
    if isinstance(value, str):
        return {"name": value}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str) or not value.get("name"):
        raise CodecError(f"the codec config must be an object with a name (e.g. {{name: fp16}}), got {value!r}; "
                         "choose one with codec=<name>")
    return dict(value)


@dataclass
class ActiveCodec:
    """The selected codec plugin, called the way the core calls it.

    ``state`` is the client's codec state across rounds (e.g. the residual a
    top-k codec feeds back); the server never uses it.
    """

    config: dict[str, Any]
    hook: Any
    who: str
    state: dict = field(default_factory=dict)
    plain: bool = False  # the built-in ``none``: the update is the plain safetensors file of the weights

    def encode_for_upload(self, weights: StateDict, reference: StateDict) -> Any:
        """What a client uploads: :meth:`encode`'s bytes, or for the plain codec a layout of the tensors.

        The plain codec's bytes are the safetensors file of ``weights``; a
        :class:`fedplug.wire.SafetensorsLayout` reads its chunks straight from the
        tensors, so the upload costs no model-sized buffer and no serialisation pass.
        The same file either way (``to_bytes()`` for an inline, protocol-1 upload).
        """
        if not self.plain:
            return self.encode(weights, reference)
        layout = SafetensorsLayout(weights)
        bound = size_bound(reference)
        if layout.size > bound:
            raise CodecError(f"{self.who} encoded the update into {layout.size} bytes, over the limit of {bound} "
                             "(the model's raw tensors plus header room) that the server accepts")
        return layout

    @property
    def name(self) -> str:
        return str(self.config["name"])

    def encode(self, weights: StateDict, reference: StateDict, *, state: dict | None = None) -> bytes:
        """The bytes of ``weights`` for ``client_update`` (client, worker thread).

        Raises :class:`CodecError` when the codec cannot encode them (e.g. a value
        beyond float16's range) or produces something the server would refuse.
        """
        try:
            data = self.hook.fedplug_encode_update(weights=weights, reference=reference, config=self.config,
                                                   state=self.state if state is None else state)
        except WireError as exc:
            raise CodecError(f"{self.who} cannot encode the update: {exc}") from None
        except Exception as exc:
            raise CodecError(f"{self.who} raised {type(exc).__name__} in fedplug_encode_update: {exc}") from exc
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise CodecError(f"{self.who} returned {type(data).__name__} from fedplug_encode_update, expected bytes")
        bound = size_bound(reference)
        if len(data) > bound:
            raise CodecError(f"{self.who} encoded the update into {len(data)} bytes, over the limit of {bound} "
                             "(the model's raw tensors plus header room) that the server accepts")
        return data

    def decode(self, data: Any, reference: StateDict, spec: ModelSpec | None = None) -> StateDict:
        """A peer's ``client_update`` bytes (or the file they were spilled to) as a full, checked state dict.

        Called by the server in a worker thread.

        Raises :class:`CodecError` for bytes that are not a valid encoding of an
        update of this model, never anything else.
        """
        bound = size_bound(reference)
        if isinstance(data, Path):  # a v2 upload the server spilled to a file
            try:
                size = data.stat().st_size
                if size > bound:
                    raise CodecError(f"weights are {size} bytes, over the limit of {bound} for this model")
                data = data.read_bytes()
            except OSError as exc:
                raise CodecError(f"cannot read the received weights: {exc}") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"weights must be binary data encoded with {self.who}, got {type(data).__name__}")
        if len(data) > bound:
            raise CodecError(f"weights are {len(data)} bytes, over the limit of {bound} for this model")
        try:
            state = self.hook.fedplug_decode_update(data=data, reference=reference, config=self.config,
                                                    max_bytes=bound)
        except WireError as exc:
            raise CodecError(f"{self.who} cannot decode the update: {exc} (the client must encode its update "
                             f"with the codec announced in init.codec)") from None
        except Exception as exc:  # a codec bug must not take the server with it
            raise CodecError(f"{self.who} raised {type(exc).__name__} in fedplug_decode_update: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CodecError(f"{self.who} returned {type(state).__name__} from fedplug_decode_update, "
                             "expected a dict of tensors (a full state dict)")
        check_against_spec(state, spec if spec is not None else spec_of(reference))
        return state

    def check(self, reference: StateDict | None = None) -> None:
        """Round-trip ``reference`` (default: a tiny probe state) once, so a bad config fails now, not in round 1."""
        probe = reference if reference is not None else _probe_state()
        moved = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in probe.items()}
        self.decode(self.encode(moved, probe, state={}), probe)


def open_codec(value: Any = None, *, activate: Callable[..., Any] | None = None,
               reference: StateDict | None = None) -> ActiveCodec:
    """Load the codec plugin that ``value`` (a config node, a dict with ``name``, a name, or None) selects.

    Raises :class:`fedplug.plugins.PluginError` when no such codec is
    installed, and :class:`CodecError` when its config does not work (checked
    with a round trip of ``reference``, or of a tiny probe state).
    ``activate`` is :func:`fedplug.plugins.activate` unless a test gives
    another.
    """
    from fedplug import plugins

    config = codec_config(value)
    active = (activate or plugins.activate)({"codec": config["name"]}, observers=False)
    info = active.selected.get("codec")
    who = f"codec {info.describe()}" if info is not None else f"codec {config['name']!r}"
    codec = ActiveCodec(config, active.hook, who, plain=info is not None and info.value == PLAIN_CODEC)
    codec.check(reference)
    return codec
