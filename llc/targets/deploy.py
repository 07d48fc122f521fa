"""`llc deploy / status / logs / stop / profile`: builds on phones over adb (targets/adb.py).

    llc deploy BUILD              push what changed, start the launchers detached, wait for hello
    llc run BUILD --prompt ...    attaches to them by itself (build/run/deploy.json)
    llc status BUILD              adb state, launcher pid, ping time per device
    llc logs BUILD DEVICE         the launcher's log on the phone
    llc stop BUILD [--purge]      kill the launchers by pid file, check they are gone
    llc profile PHONES.yaml -o MEASURED.yaml

Every command takes --adb-port for a private adb server (the lab's); otherwise
ADB_SERVER_SOCKET, otherwise the server `llc deploy` used, otherwise adb's
default. A device problem is one line naming the device, exit code 1; a bad
file is exit code 2, as everywhere in llc (llc.errors).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from llc.errors import one_line_errors
from llc.progress import to_stderr
from llc.runtime.coordinator import Coordinator
from llc.runtime.device.protocol import PING, PONG
from llc.targets.adb import AdbTarget, adb_for_build

_port_opt = click.option("--adb-port", type=click.IntRange(1, 65535), default=None,
                         help="adb server port (default: ADB_SERVER_SOCKET, or what `llc deploy` used).")
_build_arg = click.argument("build", type=click.Path(exists=True, file_okay=False, path_type=Path))


def _target(build: Path, adb_port: int | None, devices: list[str] | None = None) -> AdbTarget:
    return AdbTarget(adb_for_build(build, adb_port)).open(build, devices)


@click.command("deploy")
@_build_arg
@_port_opt
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for every launcher's hello.")
@one_line_errors
def deploy(build: Path, adb_port: int | None, timeout: float) -> None:
    """Push BUILD's bundles to its adb devices and start them (`llc run BUILD` then attaches)."""
    target = AdbTarget(adb_for_build(build, adb_port), ready_timeout=timeout, say=to_stderr)
    t0 = time.monotonic()
    try:
        results = target.deploy(build)
    finally:
        target.close()
    total = sum(r.pushed_bytes for r in results.values())
    for name, r in results.items():
        what = f"pushed {len(r.pushed_files)} file(s), {r.pushed_bytes} bytes" if r.pushed_files else "up to date"
        if r.linked_files:
            what += f" ({len(r.linked_files)} weight file(s) linked from another build on the phone)"
        click.echo(f"  {name} ({r.serial}): {what}; launcher pid {r.pid} in {r.dir}")
    click.echo(f"deployed build {target.build_id} to {len(results)} device(s) in {time.monotonic() - t0:.1f} s: "
               f"{total} bytes pushed; `llc run {build}` attaches, `llc stop {build}` stops")


@click.command("status")
@_build_arg
@_port_opt
@one_line_errors
def status(build: Path, adb_port: int | None) -> None:
    """Show BUILD's devices: adb state, launcher pid, ping time. Exit 1 unless all run."""
    target = _target(build, adb_port)
    rows = target.status()
    pings = _ping({r.name for r in rows if r.launcher == "running"}, build)
    click.echo(f"build {target.build_id} ({target.remote_dir})")
    for r in rows:
        ping = pings.get(r.name)
        answer = "" if r.launcher != "running" else (f", ping {ping:.1f} ms" if ping is not None else ", no pong")
        click.echo(f"  {r.name:<14} {r.serial:<22} adb={r.adb:<12} launcher={r.launcher}"
                   + (f" (pid {r.pid})" if r.pid else "") + answer)
    if any(r.launcher != "running" or r.name not in pings for r in rows):
        sys.exit(1)


def _ping(devices: set[str], build: Path, timeout: float = 3.0) -> dict[str, float]:
    """Round-trip ms of a `ping` per device (ping, not hello: a running `llc run` keeps its tokens)."""
    if not devices:
        return {}
    got: dict[str, float] = {}
    with Coordinator(build) as c:
        sent = {}
        for name in devices:
            sent[name] = time.monotonic()
            c.send(name, PING, t=time.time())
        deadline = time.monotonic() + timeout
        while len(got) < len(devices) and time.monotonic() < deadline:
            for name, msg in c.receive(0.1):
                if msg.type == PONG and name in sent:
                    got[name] = (time.monotonic() - sent[name]) * 1000
    return got


@click.command("logs")
@_build_arg
@click.argument("device")
@_port_opt
@click.option("-n", "--lines", type=click.IntRange(0), default=0, help="Only the last N lines (0: all).")
@one_line_errors
def logs(build: Path, device: str, adb_port: int | None, lines: int) -> None:
    """Print DEVICE's launcher log (from the phone) for BUILD."""
    target = _target(build, adb_port, [device])
    text = target.logs(device)
    if lines:
        text = "\n".join(text.splitlines()[-lines:]) + "\n"
    click.echo(text, nl=False)


@click.command("stop")
@_build_arg
@_port_opt
@click.option("--purge", is_flag=True, help="Also delete the bundle from the phones.")
@one_line_errors
def stop(build: Path, adb_port: int | None, purge: bool) -> None:
    """Stop BUILD's launchers on every device (by pid file) and check that none is left."""
    target = _target(build, adb_port)
    problems = target.stop_all(purge=purge)
    for name, problem in problems.items():
        click.echo(f"llc stop: device {name!r}: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"stopped build {target.build_id} on {len(target.phones)} device(s)" + (" (purged)" if purge else ""))


@click.command("profile")
@click.argument("phones", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the measured profile.")
@_port_opt
@click.option("--seconds", default=2.0, show_default=True, type=click.FloatRange(0.2),
              help="Wall time per compute measurement per device.")
@click.option("--net-seconds", default=1.5, show_default=True, type=click.FloatRange(0.2),
              help="Wall time of each phone-to-phone bandwidth stream.")
@click.option("--net-port", default=5590, show_default=True, type=click.IntRange(1024, 65535),
              help="TCP port the probe server listens on during link measurements.")
@click.option("--no-network", is_flag=True, help="Measure only the devices, keep network as it is.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the raw measurements (decode/prefill GFLOP/s, CPU share, links) here.")
@one_line_errors
def profile(phones: Path, out: Path, adb_port: int | None, seconds: float, net_seconds: float, net_port: int,
            no_network: bool, json_out: Path | None) -> None:
    """Measure the devices in PHONES.yaml (speed, memory, links) and write a profile for `llc compile`."""
    from llc.targets.profiler import measure

    measure(phones, out, adb_for_build(None, adb_port), seconds=seconds, net_seconds=net_seconds, port=net_port,
            network=not no_network, log=lambda s: click.echo(s, err=True), json_out=json_out)
    click.echo(f"wrote {out}")


commands = [deploy, status, logs, stop, profile]

