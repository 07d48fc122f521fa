"""layout: the build's identity, where each device listens, and everyone's CURVE keys.

before: a plan (which device runs which stage)
after:  ``state.layout``: the build id, per device its bind address, the
        endpoint peers and the coordinator reach it at, and its key pair; the
        coordinator's key pair.

The build id is a hash of what the build is made from (the model's and its
data's sha256, the profile's, the compile options, the llc version), of the
plan, and of the user's build secret: the same inputs give the same id, so a
CI job can use it as a cache key, and any change gives a new one.

Keys are derived, not drawn, so the same inputs still give byte-identical
bundles: each key is an HMAC of the build id under a secret kept outside the
build (``~/.config/llc/build-secret``, made once with os.urandom). A new model
or profile gets new keys; nobody without the secret can derive them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import zmq
from zmq.utils import z85

import llc
from llc.compiler.state import CompileState, DeviceNetwork, Layout


def secret_file() -> Path:
    return Path(os.environ.get("LLC_SECRET_FILE", Path.home() / ".config" / "llc" / "build-secret"))


def build_secret() -> bytes:
    """The per-user secret keys are derived from; created on first use, mode 0600."""
    path = secret_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another compile made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def curve_keypair(secret: bytes, build_id: str, who: str) -> tuple[str, str]:
    """A CURVE key pair (public, secret) derived from (secret, build, who): Curve25519 takes any 32 bytes."""
    raw = hmac.new(secret, f"llc-curve:{build_id}:{who}".encode(), hashlib.sha256).digest()
    sk = z85.encode(raw)
    return zmq.curve_public(sk).decode(), sk.decode()


@functools.lru_cache(maxsize=1)
def llc_version() -> str:
    """llc's version and a hash of its own source: a changed compiler never reuses an old build."""
    root = Path(llc.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".j2") and "__pycache__" not in path.parts:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{llc.__version__}+{h.hexdigest()[:12]}"


def build_inputs(state: CompileState) -> dict:
    """What the build is made from, as plain data (recorded in plan.json; compared for a no-op compile)."""
    return {"model_sha256": state.digests.model, "data_sha256": dict(sorted(state.digests.data.items())),
            "profile_sha256": hashlib.sha256(Path(state.profile.path).read_bytes()).hexdigest(),
            "options": dict(sorted(state.options.items())), "llc_version": llc_version()}


@dataclass(frozen=True)
class LayoutPass:
    name: ClassVar[str] = "layout"

    def run(self, state: CompileState) -> CompileState:
        secret = build_secret()
        identity = {"inputs": build_inputs(state), "stages": [asdict(s) for s in state.plan.stages],
                    "secret": hashlib.sha256(secret).hexdigest()}
        build_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        devices = {}
        for s in state.plan.stages:
            dev = state.profile.device(s.device)
            port = state.profile.port(dev)
            host = "127.0.0.1" if dev.target == "local" else "0.0.0.0"
            public, sk = curve_keypair(secret, build_id, s.device)
            devices[s.device] = DeviceNetwork(bind=f"tcp://{host}:{port}", endpoint=f"tcp://{dev.address}:{port}",
                                              public=public, secret=sk)
        public, sk = curve_keypair(secret, build_id, "coordinator")
        state.layout = Layout(build_id, devices, public, sk)
        return state
