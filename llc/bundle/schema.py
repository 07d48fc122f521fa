"""The build directory's documents: the only code that reads or writes them.

    plan.json         what was built from what, the stages in order, the comm map,
                      predicted costs (the compiler writes it; llc run, verify,
                      deploy and the report read it)
    coordinator.json  the coordinator's CURVE keys and where each device listens
    run/deploy.json   what `llc deploy` left running on which phone
    devices/<name>/manifest.json   see llc.runtime.device.manifest (the device
                      reads it without llc, so it is defined there; re-exported here)

Each is a tree of frozen dataclasses with a format number; reading checks every
key (llc.runtime.device.document) and names the file and the key on any
problem, and an older or newer format says so. docs/BUNDLE.md documents them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llc.errors import LlcError
from llc.runtime.device import document
from llc.runtime.device.manifest import (FORMAT as MANIFEST_FORMAT, ROLES, GraphInput, Input, KeyPair, Manifest,
                                         Peer, Send, read_manifest, write_manifest)

__all__ = ["PLAN", "COORDINATOR", "DEPLOY", "MANIFEST_FORMAT", "Build", "BuildInputs", "CommEdgeDoc",
           "CoordinatorDoc", "DeployRecord", "DeviceDeploy", "DeviceEndpoint", "GraphInput", "Input", "KeyPair",
           "LinkDoc", "Manifest", "ModelDoc", "Peer", "PlanDoc", "Predicted", "Send", "StageDoc", "BlockDoc",
           "WorkloadDoc", "KVDoc", "ROLES", "read_manifest", "write_manifest", "read", "write", "open_build"]

FORMAT = 2
PLAN, COORDINATOR, DEPLOY = "plan.json", "coordinator.json", "run/deploy.json"


@dataclass(frozen=True)
class KVDoc:
    past: str
    present: str
    seq_axis: int
    empty_shape: tuple[int, ...] | None = None  # batch 1, 0 along seq_axis: what step 0 feeds


@dataclass(frozen=True)
class ModelDoc:
    path: str  # the model the user gave
    logits: str
    kv: tuple[KVDoc, ...]
    input_roles: dict[str, str]  # graph input -> input_ids | attention_mask | position_ids | kv | other
    vocab_size: int | None = None
    weights: str = "fp32"  # fp32 (as given) | int8 | int4 (quantized by llc)
    reference: str | None = None  # the unsplit model at the same precision, when it is not `path`

    @property
    def unsplit(self) -> str:
        """What `llc verify` compares the split with: the model at the build's precision."""
        return self.reference or self.path


@dataclass(frozen=True)
class BuildInputs:
    """What a build was made from: the same hashes and options give the same build."""

    model_sha256: str  # the .onnx file
    data_sha256: dict[str, str]  # its external data files
    profile_sha256: str
    options: dict[str, str]  # compile options that change the build, as text
    llc_version: str


@dataclass(frozen=True)
class WorkloadDoc:
    prompt_tokens: int
    max_context: int
    requests_in_flight: int
    objective: str
    memory_safety: float
    runtime_overhead_mb: float
    stages: int | None = None
    max_batch: int = 1  # decode steps one stage runs as one batch (1: batching off)


@dataclass(frozen=True)
class Predicted:
    decode_ms_per_token: float
    prefill_ms: float
    bottleneck_ms: float
    tokens_per_s_one_request: float | None
    tokens_per_s_pipelined: float | None
    # with the workload's requests in flight, decode steps batched in groups of batch_group
    tokens_per_s_batched: float | None = None
    batch_group: int = 1


@dataclass(frozen=True)
class BlockDoc:
    index: int
    label: str
    kind: str
    nodes: int
    gflops_decode: float
    gflops_prefill: float
    weight_bytes: int
    kv_bytes: int


@dataclass(frozen=True)
class StageDoc:
    index: int
    device: str
    target: str
    segment: str  # relative to the build dir
    manifest: str
    blocks: tuple[int, ...]  # first, last
    labels: tuple[str, ...]  # first, last
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    compute_ms_decode: float
    compute_ms_prefill: float
    hop_ms_decode: float
    hop_ms_prefill: float
    memory_bytes: int
    memory_limit_bytes: int


@dataclass(frozen=True)
class CommEdgeDoc:
    tensor: str
    kind: str  # activation | side | shape
    dtype: str
    shape: tuple[int | str, ...] | None
    producer: str
    producer_stage: int
    consumers: tuple[str, ...]
    consumer_stages: tuple[int, ...]
    skip: bool  # goes past at least one stage
    bytes_per_token_decode: int
    bytes_prefill: int


@dataclass(frozen=True)
class LinkDoc:
    src: str
    dst: str
    bytes_per_token_decode: int
    bytes_prefill: int


@dataclass(frozen=True)
class PlanDoc:
    format: int
    build_id: str  # changes when any byte of any bundle changes
    llc_version: str
    inputs: BuildInputs
    model: ModelDoc
    profile: str
    workload: WorkloadDoc
    objective: str
    split: str  # mip, or the fixed split it was given (even, memory, a file)
    predicted: Predicted
    blocks: tuple[BlockDoc, ...]
    stages: tuple[StageDoc, ...]
    comm_map: tuple[CommEdgeDoc, ...]
    links: tuple[LinkDoc, ...]
    notes: tuple[str, ...] = ()

    def check(self, where: str) -> "PlanDoc":
        if [s.index for s in self.stages] != list(range(len(self.stages))) or not self.stages:
            raise document.DocumentError(f"{where}: stages must be listed in pipeline order 0..N-1")
        return self


@dataclass(frozen=True)
class DeviceEndpoint:
    endpoint: str  # how the coordinator reaches the device
    public: str
    target: str  # local | adb
    serial: str | None = None  # adb


@dataclass(frozen=True)
class CoordinatorDoc:
    format: int
    build_id: str
    public: str
    secret: str
    devices: dict[str, DeviceEndpoint]


@dataclass(frozen=True)
class DeviceDeploy:
    serial: str
    dir: str  # the bundle's folder on the phone
    pid: int | None = None
    pushed_files: tuple[str, ...] = ()
    pushed_bytes: int = 0
    linked_files: tuple[str, ...] = ()  # weights another build on the phone held: linked, not pushed


@dataclass(frozen=True)
class DeployRecord:
    format: int
    build_id: str
    target: str
    adb_server: str | None
    running: bool
    deployed_at: str
    pushed_bytes: int
    devices: dict[str, DeviceDeploy] = field(default_factory=dict)
    stopped_at: str | None = None


_DOCS = {PLAN: PlanDoc, COORDINATOR: CoordinatorDoc, DEPLOY: DeployRecord}


def read(build: Path, name: str):
    """One of plan.json, coordinator.json, run/deploy.json; LlcError naming the file and key."""
    path = Path(build) / name
    if not path.is_file():
        raise LlcError(build, f"not a build directory (no {name})" if name != DEPLOY else "not deployed")
    try:
        doc = document.read(_DOCS[name], path, FORMAT)
    except document.DocumentError as e:
        raise LlcError(None, str(e)) from None
    return doc.check(str(path)) if isinstance(doc, PlanDoc) else doc


def write(build: Path, name: str, doc) -> None:
    path = Path(build) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    document.write(path, doc)


@dataclass(frozen=True)
class Build:
    """A build directory with its plan and keys read and checked (what `llc run` and the targets need)."""

    dir: Path
    plan: PlanDoc
    keys: CoordinatorDoc

    @property
    def build_id(self) -> str:
        return self.plan.build_id

    @property
    def devices(self) -> list[str]:
        """Device names in pipeline order."""
        return [s.device for s in self.plan.stages]

    def manifest(self, device: str) -> Manifest:
        path = self.dir / "devices" / device / "manifest.json"
        try:
            return read_manifest(path)
        except document.DocumentError as e:
            raise LlcError(None, str(e)) from None


def open_build(build: Path) -> Build:
    build = Path(build)
    plan, keys = read(build, PLAN), read(build, COORDINATOR)
    if keys.build_id != plan.build_id or set(keys.devices) != {s.device for s in plan.stages}:
        raise LlcError(build / COORDINATOR, f"does not belong to the build in {PLAN} ({plan.build_id})")
    return Build(build, plan, keys)
