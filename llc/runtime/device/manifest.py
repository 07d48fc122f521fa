"""manifest.json: everything one device needs to run its stage, and nothing more.

The only code that reads or writes a manifest: the compiler writes it (emit),
the device reads it (main), the targets and the split runner read it through
``llc.bundle.schema``. docs/BUNDLE.md shows an example; a test checks that the
example reads with this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import document

FORMAT = 5  # 5: tensors messages carry `tokens`, which an older runtime refuses
ROLES = ("input_ids", "attention_mask", "position_ids")
PADDINGS = ("left", "right")
SOURCES = ("graph", "kv", "stage")


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85 text."""

    public: str
    secret: str


@dataclass(frozen=True)
class Peer:
    """A device this one sends to: where it listens and its CURVE public key."""

    endpoint: str
    public: str


@dataclass(frozen=True)
class Input:
    """One input of segment.onnx and where its value comes from.

    graph: built by the head from the request (``role``); kv: this device's own
    cache, ``present`` being the output that returns it grown along
    ``seq_axis`` (``shape`` is the empty cache's); stage: sent by stage
    ``from_stage`` (with its ``role`` when it is a graph input the head built).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    source: str
    role: str | None = None
    present: str | None = None
    seq_axis: int | None = None
    from_stage: int | None = None


@dataclass(frozen=True)
class GraphInput:
    """A model input the head builds for every step."""

    name: str
    role: str
    dtype: str


@dataclass(frozen=True)
class Send:
    """After each step, these tensors go to stage ``stage`` on device ``to``."""

    to: str
    stage: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    format: int
    llc_version: str
    build_id: str
    device: str
    stage: int
    num_stages: int
    threads: int
    bind: str
    keys: KeyPair
    allowed_publics: tuple[str, ...]
    peers: dict[str, Peer]
    segment: str
    files: dict[str, str]  # every file of the bundle but manifest.json -> sha256
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    sends: tuple[Send, ...]
    max_context: int  # prompt + generated tokens of one request
    max_requests: int  # requests whose KV cache the plan reserved memory for
    max_message_bytes: int  # the largest message this device accepts
    graph_inputs: tuple[GraphInput, ...] = ()  # head only
    vocab_size: int | None = None  # head: token ids must be below it
    logits: str | None = None  # tail: the output sampled from
    eos_token_ids: tuple[int, ...] = ()  # tail
    head: str | None = None  # tail (unless it is the head): the peer tokens go back to
    max_batch: int = 1  # decode steps run as one batch (see stage.py)
    batch_padding: str | None = None  # where a batch pads shorter caches: left (Concat) or right (GQA)
    kv_in_place: bool = False  # every cache is GroupQueryAttention's: one max_context buffer, written in place

    @property
    def is_head(self) -> bool:
        return self.stage == 0

    @property
    def is_tail(self) -> bool:
        return self.stage == self.num_stages - 1

    def check(self, where: str) -> "Manifest":
        """Relations between fields that types alone do not say."""
        def bad(msg: str) -> document.DocumentError:
            return document.DocumentError(f"{where}: {msg}")

        if not 0 <= self.stage < self.num_stages:
            raise bad(f"stage {self.stage} not in 0..{self.num_stages - 1}")
        for i in self.inputs:
            if i.source not in SOURCES:
                raise bad(f"input {i.name}: source {i.source!r} is not one of {', '.join(SOURCES)}")
            if i.source == "kv" and (i.present is None or i.seq_axis is None):
                raise bad(f"input {i.name}: a kv input needs present and seq_axis")
            if i.source == "stage" and (i.from_stage is None or not 0 <= i.from_stage < self.stage):
                raise bad(f"input {i.name}: from_stage must be an earlier stage")
            if i.source == "graph" and (not self.is_head or i.role not in ROLES):
                raise bad(f"input {i.name}: only the head builds graph inputs, with a role of {ROLES}")
        for g in self.graph_inputs:
            if g.role not in ROLES:
                raise bad(f"graph input {g.name}: role {g.role!r} is not one of {', '.join(ROLES)}")
        for s in self.sends:
            if s.to not in self.peers:
                raise bad(f"sends to {s.to!r}, which is not among the peers")
        if self.max_batch < 1 or (self.max_batch > 1 and self.batch_padding not in PADDINGS):
            raise bad(f"max_batch {self.max_batch} needs a batch_padding of {', '.join(PADDINGS)}")
        if self.is_tail and self.logits is None:
            raise bad("the tail needs logits")
        if self.is_tail and not self.is_head and self.head not in self.peers:
            raise bad("the tail must name the head among its peers (tokens go back to it)")
        return self


def read_manifest(path: Path) -> Manifest:
    return document.read(Manifest, path, FORMAT).check(str(path))


def write_manifest(path: Path, manifest: Manifest) -> None:
    document.write(path, manifest)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Refuse to start on any mismatch: a half-pushed bundle must not run silently wrong."""
    for rel, want in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            raise document.DocumentError(f"missing file {rel}")
        got = sha256_file(path)
        if got != want:
            raise document.DocumentError(f"sha256 mismatch for {rel}: manifest {want[:12]}..., file {got[:12]}...")
