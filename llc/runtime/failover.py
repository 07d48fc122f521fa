"""Failover: a device lost mid-generation is planned around, and every request goes on.

Phones drop out (a battery, Wi-Fi, the OS killing a background process). When
a device is *lost* (its process died, or it stopped answering pings; a device
that answers with an error is not lost, and the run fails as before):

1. every device of the broken pipeline is stopped (a partial pipeline holds
   caches of half-done steps, and nothing can be trusted to line up with them);
2. the model is compiled again by the same compiler with the same options, for
   the profile without the lost device: the MIP and the cost model plan the
   survivors, and the analysed model comes from the compile cache, so this
   takes seconds. If the model does not fit the devices left, one line says so;
3. the new bundles start (a survivor gets the weights of its new layers from
   its bundle: on phones, pushed like any deploy);
4. every unfinished request resumes: its prompt and the tokens it already has
   go in as one prompt, asking for the tokens still missing. Nothing generated
   before the loss is lost or repeated. A greedy request continues with the
   tokens it would have had; a sampled one continues from the same text, with
   fresh draws.

The re-planned builds live in ``BUILD/failover/<n>/`` beside the profile they
were planned for (``<n>.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from llc.bundle import schema
from llc.errors import DeviceError, LlcError
from llc.profile import Workload, load_profile


@dataclass
class Failover:
    """One device lost and planned around: what happened and what it cost."""

    device: str
    reason: str
    devices_left: tuple[str, ...]
    replan_s: float
    resumed: int  # requests that went on from where they were
    lost_s: float | None = None  # from the loss to the first token after it

    def line(self) -> str:
        lost = f"; {self.lost_s:.1f} s lost" if self.lost_s is not None else ""
        return (f"device {self.device} lost ({self.reason}): re-planned over {', '.join(self.devices_left)} "
                f"in {self.replan_s:.1f} s, resumed {self.resumed} request(s){lost}")


def replan(build_dir: Path, out: Path, edit: Callable[[dict], None], stages: int | None = None) -> Path:
    """Compile the build's model again into ``out``, for its profile as ``edit`` changes it.

    Same model, options and workload; the changed profile is written beside the
    new build (``out.yaml``). Exactly N stages becomes at most the devices left;
    ``stages`` asks for exactly that many instead. A file split names devices, so
    it becomes the MIP's. LlcError from the compiler (the model does not fit,
    say) passes through.
    """
    from llc.compiler import compile_model

    plan = schema.read(build_dir, schema.PLAN)
    try:
        doc = yaml.safe_load(Path(plan.profile).read_text())
    except OSError as e:
        raise LlcError(plan.profile, f"cannot read the profile to re-plan with ({e.strerror or e})") from None
    edit(doc)
    n = len(doc["devices"])
    stages = (doc.get("workload") or {}).get("stages")
    if isinstance(stages, int) and stages > n:
        doc["workload"]["stages"] = n
    out.parent.mkdir(parents=True, exist_ok=True)
    profile_path = out.with_name(out.name + ".yaml")
    profile_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    options = plan.inputs.options
    workload = Workload(**json.loads(options["workload"]))
    if workload.stages is not None and workload.stages > n:
        workload = replace(workload, stages=n)
    if stages is not None:
        workload = replace(workload, stages=min(stages, n))
    compile_model(Path(plan.model.path), load_profile(profile_path), out, workload=workload,
                  simplify=options.get("simplify") == "True", granularity=options.get("granularity", "layer"),
                  split=options.get("split") if options.get("split") in ("even", "memory") else None,
                  weights=options.get("weights", "fp32"),
                  eos_token_ids=tuple(json.loads(options.get("eos_token_ids", "[]"))), quiet=True)
    return out


def without(build_dir: Path, lost: str, root: Path, n: int) -> Path:
    """The build planned again over its devices but ``lost``, into ``root/failover/<n>``; DeviceError
    (one line) if no device is left or the model does not fit the others."""
    left: list[str] = []

    def drop(doc: dict) -> None:
        doc["devices"] = [d for d in doc.get("devices", []) if d.get("name") != lost]
        network = doc.get("network") or {}
        if isinstance(network.get("links"), list):  # measured links name their two ends
            network["links"] = [k for k in network["links"] if lost not in (k.get("between") or ())]
        left.extend(d["name"] for d in doc["devices"])
        if not left:
            raise DeviceError(lost, "lost, and no device is left to run the model")

    try:
        return replan(build_dir, root / "failover" / str(n), drop)
    except DeviceError:
        raise
    except LlcError as e:
        raise DeviceError(lost, f"lost, and the model cannot be re-planned over {', '.join(left)}: "
                                f"{e.message}") from None
