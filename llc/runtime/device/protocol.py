"""The wire protocol between devices and the coordinator: every message type, framing, checks.

A message is ZeroMQ multipart: ``[header, buffer_0, buffer_1, ...]``. The header
is UTF-8 JSON with ``type`` and the type's fields; tensors are listed in
``tensors: [{"name", "dtype", "shape"}]``, one per buffer, each buffer raw
C-contiguous little-endian bytes. Never pickle.

:func:`unpack` is the one place a received message is checked: JSON, a known
type, every field of the right type, no unknown field, tensor dtypes from a
short list, shapes of non-negative ints whose bytes match the buffer. A
message that fails raises :class:`ProtocolError` and the receiver answers with
one ``error``; nothing a peer sends can take a device down. Both sides use
:func:`pack`, so they cannot drift.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# message types
HELLO, PING, PONG, STATS, STOP = "hello", "ping", "pong", "stats", "stop"
REQUEST, TENSORS, TOKEN, END, ERROR = "request", "tensors", "token", "end", "error"

COORDINATOR = "coordinator"  # the destination name of messages for whoever said hello
MAX_HEADER_BYTES = 1 << 20
MAX_RANK = 8
DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"})
_WIRE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}  # name -> little-endian dtype
_NAMES = {dtype: name for name, dtype in _WIRE.items()}  # (a dtype's .name is slow: every tensor, every step)

_NUM = (int, float)
# type -> {field: (accepted types, required)}; replies share the request's type name
FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    HELLO: {"device": ((str,), False), "stage": ((int,), False), "num_stages": ((int,), False),
            "build_id": ((str,), False), "version": ((str,), False)},
    PING: {"t": (_NUM, False)},
    PONG: {"device": ((str,), True), "t": (_NUM + (type(None),), False), "active": ((int,), True)},
    STATS: {"device": ((str,), False), "stage": ((int,), False), "compute_ms": ((dict,), False),
            "steps": ((dict,), False), "rows": ((dict,), False), "bytes_sent": ((dict,), False), "active": ((int,), False),
            "rss_bytes": ((int,), False), "peak_rss_bytes": ((int,), False),
            "events": ((list,), False), "poll": ((bool,), False)},  # poll: counters only (a balancer's)
    STOP: {},
    # rid: request id; prompt: token ids; params: SamplingParams as a dict
    REQUEST: {"rid": ((int,), True), "prompt": ((list,), True), "params": ((dict,), True)},
    # inputs of one step of a batch for a later stage: row b is request rids[b] at steps[b]; width: the
    # batch's padded past length; tokens: new tokens per row; a prefill (one row, step 0) carries params
    # so the tail learns them
    TENSORS: {"rids": ((list,), True), "steps": ((list,), True), "width": ((int,), True), "tokens": ((int,), True),
              "from": ((str,), True), "params": ((dict,), False)},
    # step k carries generated token k+1; done: EOS or max_new_tokens
    TOKEN: {"rid": ((int,), True), "step": ((int,), True), "token": ((int,), True), "done": ((bool,), True)},
    # free the request's state; forward: pass it on to the devices in this one's sends
    END: {"rid": ((int,), True), "forward": ((bool,), True)},
    ERROR: {"device": ((str,), True), "rid": ((int, type(None)), False), "message": ((str,), True)},
}


class ProtocolError(ValueError):
    """A message that is not what this protocol sends."""


@dataclass
class Message:
    type: str
    fields: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def pack(kind: str, tensors: list[tuple[str, np.ndarray]] | None = None, **fields: Any) -> list[bytes]:
    """Frames of a message; raises ProtocolError if it would not pass :func:`unpack`."""
    _check_fields(kind, fields)
    metas, buffers = [], []
    for name, array in tensors or ():
        dtype = _NAMES.get(array.dtype)
        if dtype is None:  # big-endian, or not a wire dtype (unpack refuses those)
            array = array.astype(array.dtype.newbyteorder("<"))
            dtype = _NAMES.get(array.dtype, array.dtype.name)
        metas.append({"name": name, "dtype": dtype, "shape": list(array.shape)})
        buffers.append(array.tobytes())  # C order, whatever the array's layout
    header = {"type": kind, **fields}
    if metas:
        header["tensors"] = metas
    return [json.dumps(header, separators=(",", ":")).encode(), *buffers]


def unpack(frames: list[bytes]) -> Message:
    """Check and decode a received message (see the module docstring)."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frames[0])} bytes")
    try:
        header = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON ({str(e)[:60]})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    kind = header.pop("type", None)
    metas = header.pop("tensors", [])
    _check_fields(kind, header)
    if not isinstance(metas, list) or len(metas) != len(frames) - 1:
        raise ProtocolError(f"{len(metas) if isinstance(metas, list) else '?'} tensors declared, "
                            f"{len(frames) - 1} buffers sent")
    arrays = {}
    for meta, buf in zip(metas, frames[1:]):
        name, dtype, shape = _check_meta(meta)
        if len(buf) != dtype.itemsize * math.prod(shape):
            raise ProtocolError(f"tensor {name}: {len(buf)} bytes for {dtype.name}{shape}")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(kind, header, arrays)


def _check_fields(kind: Any, fields: dict) -> None:
    spec = FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ProtocolError(f"unknown message type {kind!r:.40}")
    unknown = set(fields) - set(spec)
    if unknown:
        raise ProtocolError(f"{kind}: unknown field {sorted(unknown)[0]!r:.40}")
    for name, (types, required) in spec.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{kind}: field {name} has a bad value {value!r:.40}")


def _check_meta(meta: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(meta, dict) or set(meta) != {"name", "dtype", "shape"}:
        raise ProtocolError("a tensor needs exactly name, dtype and shape")
    name, dtype, shape = meta["name"], meta["dtype"], meta["shape"]
    if not isinstance(name, str) or not name:
        raise ProtocolError("a tensor name must be a non-empty string")
    if dtype not in DTYPES:
        raise ProtocolError(f"tensor {name}: dtype {dtype!r:.20} is not one of {', '.join(sorted(DTYPES))}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError(f"tensor {name}: bad shape {shape!r:.60}")
    return name, _WIRE[dtype], tuple(shape)
