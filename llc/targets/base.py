"""What `llc run` needs from a deployment target, whatever runs the devices.

A target starts the launchers of a build (local processes, phones over adb),
reports which ones died, shows their logs and stops them all. The coordinator
does not know which target started the devices: it only talks ZeroMQ to the
endpoints in build/coordinator.json.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

from llc.errors import DeviceError, LlcError


class TargetError(DeviceError):
    """A device could not be started or reached; ``device`` names it so the user knows where to look."""


@runtime_checkable
class Target(Protocol):
    name: str

    def start(self, build_dir: Path, devices: list[str]) -> None:
        """Start each device's launcher and return once every one answers hello."""

    def health(self) -> dict[str, str]:
        """Devices known to be dead, with why (``{}`` when all seem alive); must be cheap."""

    def logs(self, device: str) -> str:
        """What the device's launcher has written so far."""

    def stop(self) -> None:
        """Stop every device this target started; idempotent, leaves no process behind."""


# name -> "module:Class"; adding a target is a module plus one line here.
TARGETS = {
    "local": "llc.targets.local:LocalTarget",
    "adb": "llc.targets.adb:AdbTarget",
}


def make_target(name: str) -> Target:
    """A fresh target instance by name (imported lazily: adb needs tools local does not)."""
    if name not in TARGETS:
        raise LlcError(None, f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}")
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
