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
were planned for (``profile-<n>.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

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


def replan(build_dir: Path, lost: str, root: Path, n: int) -> Path:
    """Compile the build's model again for its profile without ``lost``, into ``root/failover/<n>``.

    Same model, options and workload (exactly N stages becomes at most the devices
    left; a file split names devices, so it becomes the MIP's). DeviceError if nothing
    is left or the model no longer fits.
    """
    from llc.compiler import compile_model

    plan = schema.read(build_dir, schema.PLAN)
    try:
        doc = yaml.safe_load(Path(plan.profile).read_text())
    except OSError as e:
        raise DeviceError(lost, f"lost, and the profile {plan.profile} to re-plan with cannot be read "
                                f"({e.strerror or e})") from None
    doc["devices"] = [d for d in doc.get("devices", []) if d.get("name") != lost]
    left = [d["name"] for d in doc["devices"]]
    if not left:
        raise DeviceError(lost, "lost, and no device is left to run the model")
    stages = (doc.get("workload") or {}).get("stages")
    if isinstance(stages, int) and stages > len(left):
        doc["workload"]["stages"] = len(left)
    folder = root / "failover"
    folder.mkdir(parents=True, exist_ok=True)
    profile_path = folder / f"profile-{n}.yaml"
    profile_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    options = plan.inputs.options
    workload = Workload(**json.loads(options["workload"]))
    if workload.stages is not None and workload.stages > len(left):
        workload = replace(workload, stages=len(left))
    try:
        compile_model(Path(plan.model.path), load_profile(profile_path), folder / str(n), workload=workload,
                      simplify=options.get("simplify") == "True", granularity=options.get("granularity", "layer"),
                      split=options.get("split") if options.get("split") in ("even", "memory") else None,
                      weights=options.get("weights", "fp32"),
                      eos_token_ids=tuple(json.loads(options.get("eos_token_ids", "[]"))), quiet=True)
    except LlcError as e:
        raise DeviceError(lost, f"lost, and the model cannot be re-planned over {', '.join(left)}: "
                                f"{e.message}") from None
    return folder / str(n)
