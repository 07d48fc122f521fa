"""Run a build's devices on Android phones (or the phone lab) through the stock `adb` client.

Why plain `adb` by subprocess: it is what every phone owner already has, it
works over USB and Wi-Fi alike, and the lab (llc/lab.py) is Google's real adbd,
so what passes there is what phones do. Every call gets an argument list, a
timeout and `-s SERIAL`; the adb server is the one in ADB_SERVER_SOCKET unless
an explicit server (`--adb-port`) is given.

Per device, the bundle (build/devices/<name>/*) goes to
/data/local/tmp/llc/<build-id>/. Only files whose sha256 on the phone differs
from the build are pushed, so deploying again pushes nothing and a push cut
short is completed by the next deploy (at file granularity). Weights are files
named by their content (w-<hash>.bin, llc.compiler.segment): one that another
build on the phone already holds, in its folder or among its spares, is linked
from there, not pushed, so a re-plan that moves layers between phones which
hold them (llc.runtime.balance, failover) pushes no weights. The launcher runs
detached (`nohup sh run.sh`) with launcher.pid and launcher.log in that folder,
so it outlives `llc deploy`; a later `llc run` attaches to it and `llc stop`
kills it by its pid file. Phones have no pid namespace to hide in and
`pkill -f` could hit anything, so a pid only counts if /proc/<pid>/cmdline
still says llc_runtime.

Device scripts are POSIX sh (Android's mksh, the lab's dash): no bashisms, no
getprop, no reliance on the shell's exit code (old adbd lacks shell v2).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llc.bundle import schema
from llc.bundle.schema import DeviceDeploy
from llc.errors import LlcError
from llc.progress import Progress
from llc.runtime.coordinator import DeviceFailure, wait_ready
from llc.runtime.device.manifest import sha256_file
from llc.targets.base import TargetError

REMOTE_ROOT = "/data/local/tmp/llc"  # the one folder `adb push` may write to on a stock phone
RUNTIME_HINT = "on Termux: pkg install python python-numpy; pip install onnxruntime pyzmq"
RUNTIME_MODULES = {"numpy": "numpy", "onnxruntime": "onnxruntime", "zmq": "pyzmq"}
ADB_TIMEOUT = 30.0  # seconds for any adb call that moves no bulk data
PUSH_MIN_BYTES_PER_S = 500_000  # push timeouts assume at least ~4 Mbit/s, plus 60 s

# Shell functions every device script starts with.
# alive PIDFILE [WORD]: the process in PIDFILE runs, is not a zombie and its
#   command line contains WORD (so a reused pid never counts).
# halt PIDFILE [WORD]: TERM, wait up to 5 s, KILL, wait; says "survived PID" if it could not.
SH_LIB = r"""
alive() {
  p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null && return 1
  grep -q "${2:-llc_runtime}" "/proc/$p/cmdline" 2>/dev/null
}
nap() { sleep 0.1 2>/dev/null || sleep 1; }
halt() {
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  q=$(cat "$1"); kill -s TERM "$q" 2>/dev/null; i=0
  while alive "$1" "$2" && [ $i -lt 50 ]; do nap; i=$((i+1)); done
  if alive "$1" "$2"; then
    kill -s KILL "$q" 2>/dev/null; i=0
    while alive "$1" "$2" && [ $i -lt 50 ]; do nap; i=$((i+1)); done
  fi
  if alive "$1" "$2"; then echo "survived $q"; return 1; fi
  rm -f "$1"
}
"""


@dataclass(frozen=True)
class Adb:
    """The stock adb client talking to one adb server.

    ``server`` is an ADB_SERVER_SOCKET value (``tcp:localhost:5137``); None
    leaves adb to its environment / default (5037). ``exe`` lets tests use a
    fake adb.
    """

    server: str | None = None
    exe: str = "adb"

    @staticmethod
    def for_port(port: int | None) -> "Adb":
        return Adb(f"tcp:localhost:{port}" if port else None)

    def run(self, args: list[str], *, serial: str | None = None, device: str = "adb",
            timeout: float = ADB_TIMEOUT) -> subprocess.CompletedProcess:
        """One adb call; a missing adb or a timeout is a TargetError naming ``device``."""
        cmd = [self.exe] + (["-s", serial] if serial else []) + args
        env = dict(os.environ, ADB_SERVER_SOCKET=self.server) if self.server else None
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise TargetError(device, f"`{self.exe}` not found: install Android platform tools "
                                      "(Debian/Ubuntu: apt install adb)") from None
        except subprocess.TimeoutExpired:
            where = f" on {serial}" if serial else ""
            raise TargetError(device, f"`adb {' '.join(args)[:60]}`{where} timed out after {timeout:.0f} s "
                                      "(is the phone reachable?)") from None

    def devices(self) -> dict[str, str]:
        """serial -> state (device, offline, unauthorized, ...), as `adb devices` lists them."""
        out = self.run(["devices"])
        states = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("List of", "*")):
                states[parts[0]] = parts[1]
        return states

    def shell(self, serial: str, script: str, *, device: str, timeout: float = ADB_TIMEOUT) -> str:
        """Run a POSIX sh script on the phone; its stdout. Fails only if adb itself fails."""
        proc = self.run(["shell", script], serial=serial, device=device, timeout=timeout)
        if proc.returncode != 0 and proc.stderr.strip().startswith(("adb:", "error:")):
            raise TargetError(device, f"adb shell on {serial}: {_last(proc.stderr)}")
        return proc.stdout.replace("\r\n", "\n")


@dataclass(frozen=True)
class Phone:
    """A device of the build as adb sees it."""

    name: str
    serial: str


def connect(adb: Adb, phone: Phone, listed: dict[str, str] | None = None) -> None:
    """Make sure `adb devices` lists the phone as `device`; otherwise a one-line reason.

    `adb connect` exits 0 even when it fails, so only `adb devices` is believed.
    """
    listed = adb.devices() if listed is None else listed
    state = listed.get(phone.serial)
    said = ""
    if state in (None, "offline") and _is_network(phone.serial):
        if state == "offline":  # a stale connection: drop it and dial again
            adb.run(["disconnect", phone.serial], device=phone.name, timeout=10)
        said = _last(adb.run(["connect", phone.serial], device=phone.name, timeout=20).stdout)
        deadline = time.monotonic() + (5 if "connected to" in said else 0)  # it said why it failed: no wait
        while True:
            state = adb.devices().get(phone.serial)
            if state == "device" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    where = f"{phone.serial}"
    if state is None:
        if _is_network(phone.serial):
            raise TargetError(phone.name, f"cannot reach {where} ({said or 'adb connect failed'}); is the phone "
                                          "on the network with wireless debugging / adbd on?")
        raise TargetError(phone.name, f"{where} is not listed by `adb devices`: plug it in and enable "
                                      "USB debugging")
    if state == "unauthorized":
        raise TargetError(phone.name, f"{where} is unauthorized: unlock the phone and accept the "
                                      "'Allow USB debugging' prompt, then retry")
    if state == "offline":
        raise TargetError(phone.name, f"{where} is offline: reconnect it (replug USB or `adb reconnect`)")
    if state != "device":
        raise TargetError(phone.name, f"{where} is in state {state!r}, not 'device'")


def check_runtime(adb: Adb, phone: Phone, python: str = "python3",
                  modules: dict[str, str] = RUNTIME_MODULES) -> None:
    """The launcher needs python3 with numpy, onnxruntime and pyzmq: say what to install if not."""
    code = ("import sys\nbad = []\nfor m, pkg in %r:\n    try:\n        __import__(m)\n"
            "    except Exception as e:\n        bad.append('%%s (%%s)' %% (pkg, type(e).__name__))\n"
            "print('llc-missing: ' + ', '.join(bad) if bad else 'llc-ok')\n") % (list(modules.items()),)
    out = adb.shell(phone.serial, f"if command -v {shlex.quote(python)} >/dev/null 2>&1; then "
                                  f"{shlex.quote(python)} -c {shlex.quote(code)} 2>&1; "
                                  f"else echo llc-no-python; fi", device=phone.name, timeout=120)
    problem = runtime_problem(out, python)
    if problem:
        raise TargetError(phone.name, problem)


def runtime_problem(out: str, python: str = "python3") -> str | None:
    """What is missing, from the output of the check in check_runtime (None: all there)."""
    if "llc-ok" in out:
        return None
    if "llc-no-python" in out:
        return f"no {python} on the device; install Python 3 with numpy, onnxruntime and pyzmq ({RUNTIME_HINT})"
    for line in out.splitlines():
        if line.startswith("llc-missing: "):
            return f"{python} cannot import {line[len('llc-missing: '):]}; install them ({RUNTIME_HINT})"
    return f"{python} does not run on the device ({_last(out) or 'no output'}); {RUNTIME_HINT}"


@dataclass
class Pushed:
    """What a sync moved: file names and bytes."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0
    linked: list[str] = field(default_factory=list)  # found on the phone in another build's folder


def remote_hashes(adb: Adb, phone: Phone, remote_dir: str, names: list[str]) -> dict[str, str]:
    """name -> sha256 of the files that exist in remote_dir, computed on the phone."""
    if not names:
        return {}
    files = " ".join(shlex.quote(n) for n in names)
    script = (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 0\n"
              "if command -v sha256sum >/dev/null 2>&1; then S=sha256sum; else S='toybox sha256sum'; fi\n"
              f"for f in {files}; do [ -f \"$f\" ] && $S \"$f\"; done; echo llc-done")
    out = adb.shell(phone.serial, script, device=phone.name, timeout=300)
    if "llc-done" not in out and out.strip():
        raise TargetError(phone.name, f"cannot checksum files in {remote_dir}: {_last(out)}")
    hashes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            hashes[parts[1].lstrip("*")] = parts[0]
    return hashes


def sync(adb: Adb, phone: Phone, local: dict[str, Path], remote_dir: str,
         say: Callable[[str], None] | None = None) -> Pushed:
    """Make remote_dir hold exactly these files' bytes: push the ones whose sha256 differs, verify.

    Hashing on a phone is slow (a throttled one took 12 s for 650 MB), so only
    what a build loads is hashed. Spares (spare/) and weights linked from
    another build are content-named files that were hashed when pushed:
    their size is checked, and the launcher hashes whatever it loads.
    ``say`` hears the MB pushed of the MB to push, file by file.
    """
    size = {name: path.stat().st_size for name, path in local.items()}
    spares = [n for n in sorted(local) if n.startswith("spare/")]
    want = {name: sha256_file(path) for name, path in local.items() if name not in spares}  # spares: by size
    have = remote_hashes(adb, phone, remote_dir, sorted(want))
    sizes = remote_sizes(adb, phone, remote_dir, spares)
    todo = [n for n in sorted(local) if (sizes.get(n) != size[n] if n in spares else have.get(n) != want[n])]
    pushed = Pushed()
    if todo:
        dirs = sorted({remote_dir} | {f"{remote_dir}/{Path(n).parent.as_posix()}" for n in todo if "/" in n})
        adb.shell(phone.serial, "mkdir -p " + " ".join(shlex.quote(d) for d in dirs), device=phone.name)
    named = [n for n in todo if Path(n).name.startswith("w-")]
    if named:  # content-named weights another build on the phone holds: a link, not a push
        link_from_other_builds(adb, phone, remote_dir, named)
        sizes = remote_sizes(adb, phone, remote_dir, named)
        pushed.linked = [n for n in named if sizes.get(n) == size[n]]
        todo = [n for n in todo if n not in pushed.linked]
    progress = Progress(f"{phone.name}: pushed", sum(size[n] for n in todo), say=say)
    for name in todo:
        proc = adb.run(["push", str(local[name]), f"{remote_dir}/{name}"], serial=phone.serial, device=phone.name,
                       timeout=60 + size[name] / PUSH_MIN_BYTES_PER_S)
        if proc.returncode != 0:
            text = proc.stderr + proc.stdout
            if "No space left" in text or "ENOSPC" in text:
                raise TargetError(phone.name, f"no space left on the device for {name} ({size[name] / 1e6:.1f} MB) "
                                              f"in {remote_dir}: free some storage (old builds: `llc stop --purge`)")
            raise TargetError(phone.name, f"adb push {name} to {phone.serial} failed: {_last(text)}")
        pushed.files.append(name)
        pushed.bytes += size[name]
        progress.add(size[name])
    if todo:
        have = remote_hashes(adb, phone, remote_dir, todo)
        bad = [n for n in todo if have.get(n) != (want.get(n) or sha256_file(local[n]))]
        if bad:
            raise TargetError(phone.name, f"checksum mismatch on the device after push: {', '.join(bad)}")
    return pushed


def remote_sizes(adb: Adb, phone: Phone, remote_dir: str, names: list[str]) -> dict[str, int]:
    """name -> size in bytes of the files that exist in remote_dir."""
    if not names:
        return {}
    files = " ".join(shlex.quote(n) for n in names)
    script = (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 0\n"
              f"for f in {files}; do [ -f \"$f\" ] && echo \"$(wc -c < \"$f\") $f\"; done; echo llc-done")
    out = adb.shell(phone.serial, script, device=phone.name)
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            sizes[parts[1]] = int(parts[0])
    return sizes


def link_from_other_builds(adb: Adb, phone: Phone, remote_dir: str, names: list[str]) -> None:
    """Hard-link (or copy) each of ``names`` into remote_dir from any llc folder on the phone that has a
    file of that content name; the caller checks the sizes (the launcher hashes what it loads)."""
    files = " ".join(shlex.quote(n) for n in names)
    script = (f"cd {shlex.quote(remote_dir)} || exit 0\n"
              f"for f in {files}; do b=${{f##*/}}\n"
              f"  for src in {REMOTE_ROOT}/*/\"$b\" {REMOTE_ROOT}/*/spare/\"$b\"; do\n"
              "    [ -f \"$src\" ] && ! [ \"$src\" -ef \"$f\" ] || continue\n"
              "    ln -f \"$src\" \"$f\" 2>/dev/null || cp \"$src\" \"$f\"; break\n"
              "  done\n"
              "done; echo llc-done")
    adb.shell(phone.serial, script, device=phone.name, timeout=300)


@dataclass
class DeviceStatus:
    name: str
    serial: str
    adb: str  # device / offline / unauthorized / not listed
    launcher: str  # "running", "stopped", "no bundle", or "unknown"
    pid: int | None = None


class AdbTarget:
    """Devices of a build on phones: deploy (push + start + hello), health, logs, stop."""

    name = "adb"

    def __init__(self, adb: Adb | None = None, ready_timeout: float = 60.0, health_every: float = 2.0,
                 python: str = "python3", say: Callable[[str], None] | None = None):
        self.adb = adb or Adb(os.environ.get("ADB_SERVER_SOCKET"))
        self.say = say  # progress lines (MB pushed per device)
        self.ready_timeout = ready_timeout
        self.health_every = health_every  # seconds between launcher checks (each is one adb shell per phone)
        self.python = python
        self.build_dir: Path | None = None
        self.build_id = ""
        self.phones: dict[str, Phone] = {}  # the devices this target looks after
        self._dead: dict[str, str] = {}
        self._watch: threading.Thread | None = None
        self._quit = threading.Event()

    # -- the build ------------------------------------------------------------------------------

    def open(self, build_dir: Path, devices: list[str] | None = None) -> "AdbTarget":
        """Learn the build's adb devices (serials from coordinator.json); ``devices`` picks some."""
        self.build_dir = Path(build_dir)
        build = schema.open_build(self.build_dir)
        self.build_id = build.build_id
        for name in devices if devices is not None else build.devices:
            info = build.keys.devices.get(name)
            if info is None:
                raise TargetError(name, f"not a device of {self.build_dir}")
            if info.target != "adb" or not info.serial:
                raise TargetError(name, f"target is {info.target!r}, not adb with a serial")
            self.phones[name] = Phone(name, info.serial)
        serials = [p.serial for p in self.phones.values()]
        for p in self.phones.values():
            if serials.count(p.serial) > 1:
                raise TargetError(p.name, f"serial {p.serial} is used by more than one device of the build")
        return self

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_ROOT}/{self.build_id}"

    def _each(self, fn, phones: list[Phone] | None = None) -> dict[str, object]:
        """fn(phone) on every phone at once (their links are independent); first error in build order."""
        phones = list(self.phones.values()) if phones is None else phones
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(phones)))) as pool:
            futures = {p.name: pool.submit(fn, p) for p in phones}
        results, errors = {}, []
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as e:  # noqa: BLE001 - re-raised below, the first in order
                errors.append(e)
        if errors:
            raise errors[0]
        return results

    # -- deploy ---------------------------------------------------------------------------------

    def deploy(self, build_dir: Path, devices: list[str] | None = None) -> dict[str, DeviceDeploy]:
        """Push what changed, start the launchers (detached), return once every one answers hello."""
        self.open(build_dir, devices)
        listed = self.adb.devices()
        for phone in self.phones.values():
            connect(self.adb, phone, listed)
        # Everything is pushed and checked before anything starts: a phone that fails leaves
        # the others as they were (an older build keeps running).
        pushed: dict[str, Pushed] = self._each(self._prepare)
        try:
            pids = self._each(lambda p: self._start(p, restart=bool(pushed[p.name].files or pushed[p.name].linked)))
        except BaseException:
            self.stop_all()
            raise
        results = {n: DeviceDeploy(p.serial, self.remote_dir, pids[n], tuple(pushed[n].files), pushed[n].bytes,
                                   tuple(pushed[n].linked)) for n, p in self.phones.items()}
        self._write_record(results)
        try:
            wait_ready(self.build_dir, list(self.phones), self.ready_timeout, health=self.health)
        except DeviceFailure as e:
            hint = self._log_hint(e.device)
            self.stop_all()  # half a pipeline is of no use; launcher.log stays for `llc logs`
            raise TargetError(e.device, e.reason + hint) from None
        return results

    def _prepare(self, phone: Phone) -> Pushed:
        """Runtime check (unless this build already runs there), then push what differs and verify."""
        assert self.build_dir is not None
        folder = self.build_dir / "devices" / phone.name
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts} if folder.is_dir() else {}
        if "run.sh" not in files or "manifest.json" not in files:
            raise TargetError(phone.name, f"no bundle at {folder} (run.sh or manifest.json missing)")
        if not self._running(phone):
            check_runtime(self.adb, phone, self.python)  # a running launcher proves the runtime works
        return sync(self.adb, phone, files, self.remote_dir, self.say)

    def _running(self, phone: Phone) -> bool:
        out = self.adb.shell(phone.serial, SH_LIB + f"alive {shlex.quote(self.remote_dir)}/launcher.pid "
                                                     "&& echo llc-running", device=phone.name)
        return "llc-running" in out

    def _start(self, phone: Phone, restart: bool) -> int:
        """Start run.sh detached unless this build's launcher already runs; stop other builds' launchers
        on the phone first (they would hold the port)."""
        d = shlex.quote(self.remote_dir)
        script = SH_LIB + (
            f"cd {d} || exit 0\n"
            f"for f in {REMOTE_ROOT}/*/launcher.pid; do [ \"$f\" = {d}/launcher.pid ] || halt \"$f\"; done\n"
            + ("halt launcher.pid\n" if restart else "")
            + "if alive launcher.pid; then echo \"llc-running $(cat launcher.pid)\"; exit 0; fi\n"
            "[ -f launcher.log ] && mv launcher.log launcher.log.1\n"
            f"PYTHON={shlex.quote(self.python)} PYTHONUNBUFFERED=1 nohup sh run.sh >launcher.log 2>&1 </dev/null &\n"
            "echo $! > launcher.pid\n"
            "echo \"llc-started $!\"\n")
        out = self.adb.shell(phone.serial, script, device=phone.name)
        for line in out.splitlines():
            if line.startswith(("llc-running ", "llc-started ")):
                return int(line.split()[1])
        raise TargetError(phone.name, f"could not start the launcher in {self.remote_dir}: {_last(out) or 'no output'}")

    def _write_record(self, results: dict[str, DeviceDeploy]) -> None:
        schema.write(self.build_dir, schema.DEPLOY, schema.DeployRecord(
            format=schema.FORMAT, build_id=self.build_id, target="adb", adb_server=self.adb.server, running=True,
            deployed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            pushed_bytes=sum(r.pushed_bytes for r in results.values()), devices=results))

    # -- Target protocol ------------------------------------------------------------------------

    def start(self, build_dir: Path, devices: list[str]) -> None:
        """`llc run --target adb`: deploy, and stop everything on the way out."""
        try:
            self.deploy(build_dir, devices)
        except BaseException:
            self.stop()
            raise

    def attach(self, build_dir: Path) -> bool:
        """Look after the launchers `llc deploy` left running for this build (True if there is a record)."""
        try:
            record = schema.read(build_dir, schema.DEPLOY)
        except LlcError:
            return False
        if record.build_id != schema.read(build_dir, schema.PLAN).build_id or not record.running:
            return False
        self.open(build_dir, list(record.devices))
        return True

    def health(self) -> dict[str, str]:
        """Launchers known dead (cached; a background thread asks the phones every few seconds)."""
        if self._watch is None and self.phones:
            self._quit.clear()
            self._dead = {}
            self._watch = threading.Thread(target=self._watch_loop, name="llc-adb-health", daemon=True)
            self._watch.start()
        return dict(self._dead)

    def _watch_loop(self) -> None:
        while not self._quit.is_set():
            for phone in list(self.phones.values()):
                problem = self._check(phone)
                if problem:
                    self._dead[phone.name] = problem
            self._quit.wait(self.health_every)

    def _check(self, phone: Phone) -> str | None:
        """Why the phone's launcher is dead, or None (also when adb cannot tell: pings catch hangs)."""
        d = shlex.quote(self.remote_dir)
        script = SH_LIB + (f"cd {d} 2>/dev/null || {{ echo 'llc-dead no bundle in {self.remote_dir}'; exit 0; }}\n"
                            "if alive launcher.pid; then echo llc-alive; else "
                            "echo \"llc-dead $(grep -v '^[[:space:]]*$' launcher.log 2>/dev/null | tail -n 1)\"; fi")
        try:
            out = self.adb.shell(phone.serial, script, device=phone.name, timeout=10)
        except TargetError:
            return None
        for line in out.splitlines():
            if line.startswith("llc-dead"):
                last = line[len("llc-dead"):].strip()
                return f"launcher on {phone.serial} is not running" + (f" (last log line: {last})" if last else "")
        return None

    def logs(self, device: str) -> str:
        phone = self.phones.get(device)
        if phone is None:
            return ""
        try:
            return self.adb.shell(phone.serial, f"cat {shlex.quote(self.remote_dir)}/launcher.log 2>/dev/null",
                                  device=device, timeout=30)
        except TargetError:
            return ""

    def _log_hint(self, device: str) -> str:
        lines = [line for line in self.logs(device).splitlines() if line.strip()]
        return f" (last log line: {lines[-1].strip()})" if lines and "last log line" not in lines[-1] else ""

    def close(self) -> None:
        """Stop watching (the launchers keep running)."""
        self._quit.set()
        if self._watch is not None:
            self._watch.join(timeout=15)
            self._watch = None

    def stop(self) -> None:
        """Stop every launcher of this build on its phones; problems go to stderr (see stop_all)."""
        for device, problem in self.stop_all().items():
            print(f"llc: warning: device {device!r}: {problem}", flush=True, file=sys.stderr)

    def stop_all(self, purge: bool = False) -> dict[str, str]:
        """Kill each launcher by its pid file and check it is gone; device -> problem for those that failed.

        ``purge`` also deletes the bundle from the phone.
        """
        self.close()
        if not self.phones:
            return {}
        d = shlex.quote(self.remote_dir)

        def stop_one(phone: Phone) -> str | None:
            script = SH_LIB + (f"cd {d} 2>/dev/null || {{ echo llc-stopped; exit 0; }}\n"
                                "if halt launcher.pid; then echo llc-stopped; fi\n"
                                + (f"cd / && rm -rf {d} && echo llc-purged\n" if purge else ""))
            try:
                out = self.adb.shell(phone.serial, script, device=phone.name)
            except TargetError as e:
                return _reason(e)
            if "llc-stopped" not in out:
                return f"launcher in {self.remote_dir} still running on {phone.serial}: {_last(out)}"
            return None

        problems: dict[str, str] = {}
        for phone in self.phones.values():  # connect first: a phone that was rebooted needs `adb connect`
            try:
                connect(self.adb, phone)
            except TargetError as e:
                problems[phone.name] = _reason(e)
        results = self._each(stop_one, [p for p in self.phones.values() if p.name not in problems])
        problems.update({n: str(r) for n, r in results.items() if r})
        if not problems and self.build_dir is not None and (self.build_dir / schema.DEPLOY).is_file():
            record = schema.read(self.build_dir, schema.DEPLOY)  # kept: it knows the adb server
            schema.write(self.build_dir, schema.DEPLOY, dataclasses.replace(
                record, running=False, stopped_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        return problems

    def status(self) -> list[DeviceStatus]:
        """Per device: adb state and whether this build's launcher runs."""
        listed = self.adb.devices()
        rows = []
        for phone in self.phones.values():
            try:
                connect(self.adb, phone, listed)
                state = "device"
            except TargetError:
                state = self.adb.devices().get(phone.serial, "not listed")
            if state != "device":
                rows.append(DeviceStatus(phone.name, phone.serial, state, "unknown"))
                continue
            d = shlex.quote(self.remote_dir)
            out = self.adb.shell(phone.serial, SH_LIB + (
                f"if [ ! -d {d} ]; then echo llc-nobundle; elif alive {d}/launcher.pid; then "
                f"echo \"llc-running $(cat {d}/launcher.pid)\"; else echo llc-stopped; fi"), device=phone.name)
            if "llc-running" in out:
                rows.append(DeviceStatus(phone.name, phone.serial, state, "running", int(out.split()[-1])))
            else:
                rows.append(DeviceStatus(phone.name, phone.serial, state,
                                         "no bundle" if "llc-nobundle" in out else "stopped"))
        return rows


def adb_for_build(build_dir: Path | None, port: int | None = None) -> Adb:
    """The adb server to use: --adb-port, else ADB_SERVER_SOCKET, else the one `llc deploy` used."""
    if port:
        return Adb.for_port(port)
    if os.environ.get("ADB_SERVER_SOCKET"):
        return Adb(os.environ["ADB_SERVER_SOCKET"])
    try:
        return Adb(schema.read(build_dir, schema.DEPLOY).adb_server)
    except (LlcError, TypeError):
        return Adb()


def deployed_target(build_dir: Path) -> AdbTarget | None:
    """An AdbTarget watching the launchers `llc deploy` left for this build, or None if none are recorded.

    `llc run` uses it to attach instead of starting devices itself.
    """
    target = AdbTarget(adb_for_build(build_dir))
    return target if target.attach(build_dir) else None


def _reason(e: TargetError) -> str:
    """The message without its "device 'x': " prefix (for tables that name the device already)."""
    return str(e).removeprefix(f"device {e.device!r}: ")


def _is_network(serial: str) -> bool:
    host, _, port = serial.rpartition(":")
    return bool(host) and port.isdigit()


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
