"""Phone lab: emulated Android phones built from Google's real `adbd` on Linux.

Why: `llc deploy` talks to phones with the stock `adb` client, and tests and
users without phones still need something that behaves like one. Debian's
`adbd` (bookworm-backports) is the same daemon phones run; started in its own
network namespace it is a "phone" that `adb connect/push/shell` accept.

Per phone the lab makes:
  - a network namespace `<name>-<phone>` with `eth0` at <subnet>.(10+i) for
    phone i = 1..N (phone1 is 10.77.0.11), wired by a veth pair to the host
    bridge `<name>br0` (<subnet>.1), so phones reach the host and each other;
  - a tbf rate limit on both ends of that veth (host side shapes host->phone,
    phone side shapes phone->anything);
  - optionally a link latency: netem is not in this kernel, so packets in and
    out of the phone's eth0 go through NFQUEUE to a process in its namespace
    that lets each one pass a fixed time later (llc/lab/delay.py). Host to
    phone is then one latency, phone to phone two (both links), as for rates;
  - a slower CPU: the phone is pinned to one core of this machine (cgroup v1
    cpuset `<name>-lab/<phone>`), and a CFS quota with a *short* period
    (`cpu/<name>-lab/<phone>`: 1 ms of CPU every 1/cpu ms, so 1 ms per 4 ms
    for cpu=0.25) slows a step of a few ms as much as a long run. A long
    period would be a budget, not a slower CPU: a pipeline stage that works
    a few ms and then waits for its neighbours would never reach it and run
    at full speed. Phones share a core only while their cpu adds up to at
    most 1, so one phone never runs on another's time, and the lab's
    cgroup outweighs the host's own processes (cpu.shares), so a busy host
    does not slow the phones;
  - a memory limit: cgroup v1 `memory/<name>-lab/<phone>` with
    memory.limit_in_bytes, which `llc profile`'s probe reads (limit less
    usage) instead of the host's MemAvailable. The cgroups are joined before
    adbd starts, so everything `adb shell` runs is slowed and limited too;
  - a private mount namespace in which a per-phone folder is bind-mounted on
    /data/local/tmp, the folder phones let `adb push` write to.

The lab uses its own adb server port so it never touches a user's adb server.
Needs root, `adb`, `adbd` and iproute2, and for latency iptables and the
NetfilterQueue package (scripts/install-lab-deps.sh, pip install '.[lab]').

CLI (`llc lab ...` or `python -m llc.lab.phones ...`):
    up --phones 3 --cpu 1,0.5,0.25 --rate 200mbit,50mbit,20mbit --memory 1500,800,400 --latency 5ms
       --state-dir /tmp/llc-lab
    status --state-dir /tmp/llc-lab
    cpu phone1 0.25 --state-dir /tmp/llc-lab     (throttle a phone mid-run; 1 restores it)
    down --state-dir /tmp/llc-lab
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import yaml

from llc.errors import LabError, one_line_errors

ADBD = "/usr/lib/android-sdk/platform-tools/adbd"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_CPUSET = Path("/sys/fs/cgroup/cpuset")
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
MIN_QUOTA_US = 1000  # the kernel's least CFS quota (and period)
LAB_CPU_SHARES = 262144  # the most the kernel allows: host processes (1024 each) barely slow a phone
ADBD_PORT = 5555
DEVICE_TMP = Path("/data/local/tmp")  # what phones expose to `adb push`
DEFAULT_STATE_DIR = "/tmp/llc-lab"
DEFAULT_ADB_PORT = 5137  # not 5037: never share the user's adb server
BASE_LATENCY_MS = 0.2  # a phone-to-phone hop of the lab without added latency (veths, bridge)
GFLOPS_PER_CORE = 8.0  # rough fp32 onnxruntime speed of one host core, for devices.yaml only

# The script run (via `unshare --mount --uts`) in front of adbd. It joins the
# cgroups first (cpu quota, cpuset, memory), so adbd and every process it spawns
# are slowed, pinned and limited; then
# bind-mounts the phone's folder on /data/local/tmp inside the private mount
# namespace and names the host after the phone (logs say which phone); then
# enters the network namespace and execs adbd. Arguments, not string
# formatting, carry the paths.
_LAUNCH = r"""
set -e
echo $$ > "$1"
echo $$ > "$2"
echo $$ > "$3"
mount --bind "$4" /data/local/tmp
hostname "$6" || true
cd /
netns=$5
shift 6
exec nsenter --net="$netns" "$@"
"""


@dataclass(frozen=True)
class PhoneSpec:
    """What one emulated phone should look like."""

    name: str | None = None  # default: phone<i>, i = 1..N
    cpu: float = 1.0  # speed as a share of one core of this machine, 0 < cpu <= 1
    rate: str = "100mbit"  # tc rate of its link, each direction
    memory_mb: int = 2000  # its memory limit (cgroup v1 memory controller): what `llc profile` reads
    latency_ms: float = 0.0  # one-way delay of its link, each direction (0: none)


@dataclass
class Phone:
    """A running emulated phone, as `adb` and the tests see it."""

    name: str
    index: int
    address: str
    serial: str  # host:port, what `adb -s` takes
    cpu: float
    cpu_quota_us: int
    cpu_period_us: int
    core: int  # the core of this machine it runs on
    rate: str
    rate_bps: int
    memory_mb: int
    netns: str
    veth: str  # host side of its link
    cgroup: str  # its cpu cgroup (the cpuset one has the same name)
    data_dir: str  # host folder that is /data/local/tmp on the phone
    pid: int  # adbd (unshare, sh and nsenter all exec into it)
    latency_ms: float = 0.0
    delay_pid: int = 0  # the process that delays its packets (llc/lab/delay.py), 0 without latency


def parse_rate(rate: str) -> int:
    """tc rate string (e.g. '200mbit', '5mbps', '1gbit') -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|bps)?\s*", rate.lower())
    if not m:
        raise LabError(f"bad rate {rate!r}: use tc syntax like 200mbit or 20mbit")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    if m.group(3) == "bps":  # tc: bps means bytes per second
        value *= 8
    if value <= 0:
        raise LabError(f"bad rate {rate!r}: must be positive")
    return int(value)


def _run(args: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout and an error that shows the command and its stderr."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {' '.join(args)}") from e
    except FileNotFoundError as e:
        raise LabError(f"{args[0]} not found: run scripts/install-lab-deps.sh") from e
    if check and proc.returncode != 0:
        raise LabError(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr.strip()}")
    return proc


def pids_of_cgroup(cgroup: Path) -> set[int]:
    """Processes in a cgroup and all of its descendants."""
    pids: set[int] = set()
    for folder in [cgroup, *(p for p in cgroup.rglob("*") if p.is_dir())] if cgroup.is_dir() else []:
        try:
            pids |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return pids


def cpu_quota(cpu: float) -> tuple[int, int]:
    """(quota, period) in us: MIN_QUOTA_US of CPU every MIN_QUOTA_US / cpu.

    The shortest period the kernel allows for the share: a throttled stretch is
    then at most a few ms, so a short burst of work is slowed like a long one.
    """
    period = max(MIN_QUOTA_US, round(MIN_QUOTA_US / cpu))
    return max(MIN_QUOTA_US, round(cpu * period)), period


def _write_cpu(cgroup: Path, cpu: float) -> tuple[int, int]:
    """Give a phone's cpu cgroup the quota of ``cpu`` (a full core: no quota); returns (quota, period)."""
    quota, period = cpu_quota(cpu)
    (cgroup / "cpu.cfs_quota_us").write_text("-1")  # the period may only change under a quota that fits it
    (cgroup / "cpu.cfs_period_us").write_text(str(period))
    (cgroup / "cpu.cfs_quota_us").write_text(str(quota if cpu < 1 else -1))
    return quota, period


def assign_cores(cpus: list[float], cores: list[int]) -> list[int]:
    """A core per phone, first fit from the fastest phone, so that no core holds more than 1.0.

    A phone then never competes with another one for CPU: each gets its share
    whatever the others do, like separate devices.
    """
    free = {c: 1.0 for c in cores}
    out = [0] * len(cpus)
    for i in sorted(range(len(cpus)), key=lambda i: -cpus[i]):
        core = next((c for c in cores if free[c] + 1e-9 >= cpus[i]), None)
        if core is None:
            raise LabError(f"phones with cpu {', '.join(f'{c:g}' for c in cpus)} need more than this machine's "
                           f"{len(cores)} core(s): each core holds phones adding up to at most 1.0")
        free[core] -= cpus[i]
        out[i] = core
    return out


def _pids_of_netns(netns: str) -> set[int]:
    proc = _run(["ip", "netns", "pids", netns], check=False, timeout=10)
    return {int(p) for p in proc.stdout.split()} if proc.returncode == 0 else set()


def _alive(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_all(pids: set[int], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout`."""
    all_pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in list(pids):  # reap our own children so they do not linger as zombies
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            pids = {p for p in pids if _alive(p)}
            if not pids:
                break
            time.sleep(0.05)
        if not pids:
            break
    if pids:
        raise LabError(f"processes survived SIGKILL: {sorted(pids)}")
    # Dead processes whose parent has exited (the CLI's `up`) are reaped by
    # init, which here takes about a second; wait so callers see none left.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in all_pids):
        time.sleep(0.05)


class Lab:
    """A set of emulated phones sharing one bridge, one cgroup and one adb server.

    `name` prefixes every kernel object (bridge `<name>br0`, namespaces
    `<name>-<phone>`, veths `<name>-<i>h`, cgroup `<name>-lab`), so the tests can
    run a lab of their own next to a user's.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike = DEFAULT_STATE_DIR,
        adb_port: int = DEFAULT_ADB_PORT,
        name: str = "llc",
        subnet: str = "10.77.0",
    ):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name):
            raise LabError(f"lab name {name!r}: 1-8 lowercase letters/digits (it ends up in interface names)")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise LabError(f"subnet {subnet!r}: give the first three octets, e.g. 10.77.0")
        self.state_dir = Path(state_dir)
        self.adb_port = int(adb_port)
        self.name = name
        self.subnet = subnet
        self.bridge = f"{name}br0"
        self.cgroup = CGROUP_CPU / f"{name}-lab"
        self.cpuset = CGROUP_CPUSET / f"{name}-lab"
        self.memcg = CGROUP_MEMORY / f"{name}-lab"
        self.phones: list[Phone] = []

    # ---- adb -------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for running `adb` against this lab's private server."""
        return {**os.environ, "ADB_SERVER_SOCKET": f"tcp:localhost:{self.adb_port}"}

    def server_running(self) -> bool:
        """Is the lab's adb server listening? (Any `adb` call would start one.)"""
        try:
            socket.create_connection(("127.0.0.1", self.adb_port), timeout=2).close()
            return True
        except OSError:
            return False

    def adb(self, *args: str, serial: str | None = None, timeout: float = 60, check: bool = True):
        """Run `adb -P <lab port> [-s serial] args...`; returns the CompletedProcess."""
        cmd = ["adb", "-P", str(self.adb_port)] + (["-s", serial] if serial else []) + list(args)
        return _run(cmd, timeout=timeout, check=check)

    # ---- up --------------------------------------------------------------

    def up(self, specs: list[PhoneSpec]) -> list[Phone]:
        """Bring up one phone per spec, connect each to the lab's adb server."""
        _preflight()
        if not specs or len(specs) > 200:
            raise LabError("give 1..200 phones")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise LabError(f"bridge {self.bridge} exists: a lab is up already (run `llc lab down` first)")
        names = [s.name or f"phone{i}" for i, s in enumerate(specs, 1)]
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}", n) for n in names):
            raise LabError(f"phone names must be unique hostnames (letters, digits, '-'; 1-32): {names}")
        for s in specs:
            if not 0 < s.cpu <= 1:
                raise LabError(f"cpu {s.cpu}: must be > 0 and at most 1 (a share of one core)")
            if not 64 <= s.memory_mb <= 1 << 20:
                raise LabError(f"memory {s.memory_mb} MB: give 64 MB or more")
            parse_rate(s.rate)
            if not 0 <= s.latency_ms <= 1000:
                raise LabError(f"latency {s.latency_ms} ms: give 0 to 1000 ms")
        if any(s.latency_ms for s in specs):
            _preflight_latency()
        cores = assign_cores([s.cpu for s in specs], sorted(os.sched_getaffinity(0)))

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.phones = []
        try:
            self._make_shared()
            for i, (spec, name, core) in enumerate(zip(specs, names, cores), 1):
                self.phones.append(self._make_phone(i, name, spec, core))
                self._save()
            self.adb("start-server", timeout=30)
            for phone in self.phones:
                self._connect(phone)
        except BaseException:
            self.down()
            raise
        self._save()
        return self.phones

    def _make_shared(self) -> None:
        """Bridge with the host's address, the parent cgroup, the /data/local/tmp mount point."""
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        self.cgroup.mkdir(exist_ok=True)
        (self.cgroup / "cpu.shares").write_text(str(LAB_CPU_SHARES))
        self.cpuset.mkdir(exist_ok=True)  # a cpuset needs its cpus and mems before it takes tasks
        for key in ("cpuset.cpus", "cpuset.mems"):
            (self.cpuset / key).write_text((CGROUP_CPUSET / key).read_text())
        self.memcg.mkdir(exist_ok=True)
        # The bind mount needs a mount point on the host's file system; an empty
        # folder there is harmless, and `down` removes it again if we made it.
        if not DEVICE_TMP.exists():
            DEVICE_TMP.mkdir(parents=True)
            (self.state_dir / "made-data-dir").write_text(str(DEVICE_TMP))

    def _make_phone(self, i: int, name: str, spec: PhoneSpec, core: int) -> Phone:
        netns = f"{self.name}-{name}"
        veth, peer = f"{self.name}-{i}h", f"{self.name}-{i}p"
        address = f"{self.subnet}.{10 + i}"
        rate_bps = parse_rate(spec.rate)
        # burst: at least 10 ms of traffic (or 32 KB) so tbf can reach its rate at HZ timer granularity
        burst = str(max(32 * 1024, rate_bps // 8 // 100))
        tbf = ["tbf", "rate", str(rate_bps), "burst", burst, "latency", "50ms"]

        _run(["ip", "netns", "add", netns])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", netns])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", netns, "link", "set", peer, "name", "eth0"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", netns, "route", "add", "default", "via", f"{self.subnet}.1"])
        _run(["tc", "qdisc", "add", "dev", veth, "root"] + tbf)  # host -> phone
        _run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "eth0", "root"] + tbf)  # phone -> out
        delay_pid = self._start_delay(netns, spec.latency_ms, self.state_dir / name) if spec.latency_ms else 0

        cgroup = self.cgroup / name
        cgroup.mkdir(exist_ok=True)
        quota, period = _write_cpu(cgroup, spec.cpu)
        memcg = self.memcg / name
        memcg.mkdir(exist_ok=True)
        (memcg / "memory.limit_in_bytes").write_text(str(spec.memory_mb << 20))
        cpuset = self.cpuset / name
        cpuset.mkdir(exist_ok=True)
        (cpuset / "cpuset.cpus").write_text(str(core))
        (cpuset / "cpuset.mems").write_text((self.cpuset / "cpuset.mems").read_text())

        phone_dir = self.state_dir / name
        data_dir = phone_dir / "data-local-tmp"
        data_dir.mkdir(parents=True, exist_ok=True)
        pid = self._start_adbd(name, address, cgroup, cpuset, memcg, data_dir, netns, phone_dir / "adbd.log")
        return Phone(
            name=name, index=i, address=address, serial=f"{address}:{ADBD_PORT}",
            cpu=spec.cpu, cpu_quota_us=quota, cpu_period_us=period, core=core, rate=spec.rate, rate_bps=rate_bps,
            memory_mb=spec.memory_mb, latency_ms=spec.latency_ms, delay_pid=delay_pid,
            netns=netns, veth=veth, cgroup=str(cgroup), data_dir=str(data_dir), pid=pid,
        )

    def _start_delay(self, netns: str, latency_ms: float, phone_dir: Path) -> int:
        """Start the phone's packet delayer in its namespace, then queue eth0's packets to it.

        The delayer binds its queue before the rules exist: a queued packet with
        no listener would be dropped.
        """
        phone_dir.mkdir(parents=True, exist_ok=True)
        ready = phone_dir / "delay.ready"
        ready.unlink(missing_ok=True)
        with open(phone_dir / "delay.log", "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "llc.lab.delay", "0", str(latency_ms), str(ready)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        deadline = time.monotonic() + 15
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise LabError(f"the packet delayer of {netns} did not start; see {phone_dir / 'delay.log'}")
            time.sleep(0.05)
        for rule in (["PREROUTING", "-i", "eth0"], ["POSTROUTING", "-o", "eth0"]):
            _run(["ip", "netns", "exec", netns, "iptables-legacy", "-t", "mangle", "-A", *rule,
                  "-j", "NFQUEUE", "--queue-num", "0"])
        return proc.pid

    def _start_adbd(self, name: str, address: str, cgroup: Path, cpuset: Path, memcg: Path, data_dir: Path,
                    netns: str, log: Path) -> int:
        """Start adbd detached (it outlives `llc lab up`) with a clean, phone-like environment.

        adbd hands its own environment to every `adb shell`, so it gets a small
        one: PATH starts with this Python's folder (python3 with numpy,
        onnxruntime, pyzmq). adbd itself sets TMPDIR=/data/local/tmp and resets
        HOME, USER, LOGNAME and SHELL from root's passwd entry (/root, /bin/bash)
        in every shell, whatever is passed here.
        """
        py_bin = os.path.dirname(sys.executable)
        env = {
            "PATH": f"{py_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(DEVICE_TMP),
            "TMPDIR": str(DEVICE_TMP),
            "LANG": "C.UTF-8",
            "LLC_LAB_PHONE": name,
        }
        args = [
            "unshare", "--mount", "--uts", "--propagation", "private", "--",
            "sh", "-c", _LAUNCH, "llc-lab-launch",
            str(cgroup / "cgroup.procs"), str(cpuset / "cgroup.procs"), str(memcg / "cgroup.procs"), str(data_dir),
            f"/run/netns/{netns}", name,
            ADBD,
        ]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/",
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"adbd for {name} exited with {proc.returncode}; see {log}")
            try:
                socket.create_connection((address, ADBD_PORT), timeout=1).close()
                return proc.pid
            except OSError:
                time.sleep(0.1)
        proc.kill()
        raise LabError(f"adbd for {name} did not listen on {address}:{ADBD_PORT} within 15s; see {log}")

    def _connect(self, phone: Phone) -> None:
        """`adb connect` and wait until the server reports the phone as `device`."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = self.adb("connect", phone.serial, timeout=15, check=False)
            if "connected to" in out.stdout:
                state = self.adb("get-state", serial=phone.serial, timeout=10, check=False)
                if state.stdout.strip() == "device":
                    return
            time.sleep(0.3)
        raise LabError(f"adb could not connect to {phone.name} at {phone.serial}")

    # ---- state -----------------------------------------------------------

    def set_cpu(self, name: str, cpu: float) -> Phone:
        """Slow a running phone down (or speed it up again), as a phone that heats up and throttles.

        Everything on the phone feels it at once, a generation in progress
        included. The phone keeps its core, so the phones on that core must
        still add up to at most 1. devices.yaml keeps the speeds the lab came
        up with, like a profile measured before the phone heated up.
        """
        phone = next((p for p in self.phones if p.name == name), None)
        if phone is None:
            raise LabError(f"no phone {name!r} in this lab (phones: {', '.join(p.name for p in self.phones)})")
        if not 0 < cpu <= 1:
            raise LabError(f"cpu {cpu}: must be > 0 and at most 1 (a share of one core)")
        others = sum(p.cpu for p in self.phones if p.core == phone.core and p is not phone)
        if others + cpu > 1 + 1e-9:
            raise LabError(f"cpu {cpu:g} for {name}: its core {phone.core} holds phones of cpu {others:g} already "
                           f"(a core holds at most 1.0)")
        phone.cpu = cpu
        phone.cpu_quota_us, phone.cpu_period_us = _write_cpu(Path(phone.cgroup), cpu)
        self._write_state()
        return phone

    def _save(self) -> None:
        self._write_state()
        (self.state_dir / "devices.yaml").write_text(self.profile_yaml())

    def _write_state(self) -> None:
        state = {
            "name": self.name, "subnet": self.subnet, "bridge": self.bridge,
            "adb_port": self.adb_port, "adb_server_socket": f"tcp:localhost:{self.adb_port}",
            "phones": [asdict(p) for p in self.phones],
        }
        (self.state_dir / "lab.json").write_text(json.dumps(state, indent=2) + "\n")

    def profile_yaml(self) -> str:
        """The phones as an llc device profile (examples/devices/), ready for `llc compile`.

        gflops is an estimate (GFLOPS_PER_CORE x cpu quota) until measured; a
        link between two phones crosses both their tbf limits, so it gets the
        lower rate and the sum of their latencies.
        """
        devices = [{
            "name": p.name, "target": "adb", "serial": p.serial, "address": p.address,
            "memory_mb": p.memory_mb, "gflops": round(GFLOPS_PER_CORE * p.cpu, 2),
            "threads": max(1, math.ceil(p.cpu)),
        } for p in self.phones]
        links = [{"between": [a.name, b.name], "bandwidth_mbps": min(a.rate_bps, b.rate_bps) / 1e6,
                  "latency_ms": round(BASE_LATENCY_MS + a.latency_ms + b.latency_ms, 3)}
                 for i, a in enumerate(self.phones) for b in self.phones[i + 1:]]
        slowest = min((p.rate_bps for p in self.phones), default=100e6) / 1e6
        worst = BASE_LATENCY_MS + 2 * max((p.latency_ms for p in self.phones), default=0.0)
        doc = {"devices": devices, "network": {"bandwidth_mbps": slowest, "latency_ms": round(worst, 3),
                                               "links": links}}
        header = (f"# llc lab: {len(devices)} emulated phones; adb server tcp:localhost:{self.adb_port}\n"
                  f"# (export ADB_SERVER_SOCKET=tcp:localhost:{self.adb_port}). gflops are estimates.\n")
        return header + yaml.safe_dump(doc, sort_keys=False)

    @classmethod
    def load(cls, state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> "Lab":
        """The lab described by `<state_dir>/lab.json` (written by `up`)."""
        path = Path(state_dir) / "lab.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab at {state_dir} (no lab.json)") from None
        lab = cls(state_dir, adb_port=state["adb_port"], name=state["name"], subnet=state["subnet"])
        lab.phones = [Phone(**p) for p in state["phones"]]
        return lab

    # ---- status / down ---------------------------------------------------

    def status(self) -> list[dict]:
        """Per phone: is adbd alive, does its namespace exist, what does adb say."""
        netns = set(_run(["ip", "netns", "list"], timeout=10).stdout.split())
        server = self.server_running()  # asking a stopped server would start a fresh, empty one
        rows = []
        for p in self.phones:
            state = self.adb("get-state", serial=p.serial, timeout=10, check=False) if server else None
            rows.append({
                "name": p.name, "serial": p.serial, "cpu": p.cpu, "rate": p.rate, "latency_ms": p.latency_ms,
                "adbd": "running" if _alive(p.pid) else "gone",
                **({"delay": "running" if _alive(p.delay_pid) else "gone"} if p.delay_pid else {}),
                "netns": "yes" if p.netns in netns else "no",
                "adb": (state.stdout.strip() or "offline") if state else "no adb server",
            })
        return rows

    def down(self) -> None:
        """Remove everything `up` made: processes, namespaces, veths, bridge, cgroups, adb server.

        Works from the kernel's view (namespace and cgroup names carry the lab's
        prefix), not only from lab.json, so a half-made or crashed lab goes too.
        """
        if self.server_running():
            self.adb("kill-server", timeout=15, check=False)
        netns_all = _run(["ip", "netns", "list"], timeout=10, check=False).stdout.split()
        mine = {n for n in netns_all if n.startswith(f"{self.name}-")} | {p.netns for p in self.phones}
        pids = {p.pid for p in self.phones if _alive(p.pid)}
        for n in mine:
            pids |= _pids_of_netns(n)
        pids |= pids_of_cgroup(self.cgroup) | pids_of_cgroup(self.cpuset) | pids_of_cgroup(self.memcg)
        pids.discard(os.getpid())
        _kill_all(pids)

        for n in mine:
            _run(["ip", "netns", "del", n], check=False, timeout=10)  # takes the phone-side veth along
        for link in Path("/sys/class/net").iterdir():  # host-side veths left by a half-made phone
            if re.fullmatch(rf"{self.name}-\d+[hp]", link.name):
                _run(["ip", "link", "del", link.name], check=False, timeout=10)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run(["ip", "link", "del", self.bridge], timeout=10)
        for root in (self.cgroup, self.cpuset, self.memcg):
            if root.is_dir():
                for sub in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _rmdir_cgroup(sub)
                _rmdir_cgroup(root)

        marker = self.state_dir / "made-data-dir"
        other_labs = [p for p in CGROUP_CPU.glob("*-lab") if p != self.cgroup]
        if marker.exists():
            for d in (DEVICE_TMP, DEVICE_TMP.parent, DEVICE_TMP.parent.parent):
                if other_labs:  # another lab's phones may still have their folder mounted there
                    break
                try:
                    d.rmdir()  # only if empty: never delete anything a user put there
                except OSError:
                    break
            marker.unlink()
        (self.state_dir / "lab.json").unlink(missing_ok=True)
        (self.state_dir / "devices.yaml").unlink(missing_ok=True)
        self.phones = []


def _rmdir_cgroup(path: Path) -> None:
    """rmdir a cgroup; the kernel may need a moment after its last task exits."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise LabError(f"could not remove cgroup {path} (tasks still in it?)")


def _preflight() -> None:
    """Fail loudly, with the fix, when the lab cannot work here."""
    if os.geteuid() != 0:
        raise LabError("the phone lab needs root (namespaces, tc, cgroups)")
    missing = [t for t in ("adb", "ip", "tc", "unshare", "nsenter") if not shutil.which(t)]
    if not os.access(ADBD, os.X_OK):
        missing.append(ADBD)
    if missing:
        raise LabError(f"missing {', '.join(missing)}: run scripts/install-lab-deps.sh")
    for controller, probe in ((CGROUP_CPU, "cpu.cfs_quota_us"), (CGROUP_CPUSET, "cpuset.cpus"),
                              (CGROUP_MEMORY, "memory.limit_in_bytes")):
        if not (controller / probe).exists():
            raise LabError(f"no cgroup v1 {controller.name} controller at {controller}")


def _preflight_latency() -> None:
    """A link latency needs iptables' NFQUEUE target and the NetfilterQueue package."""
    if not shutil.which("iptables-legacy"):
        raise LabError("--latency needs iptables-legacy: run scripts/install-lab-deps.sh")
    if importlib.util.find_spec("netfilterqueue") is None:
        raise LabError("--latency needs the NetfilterQueue package: pip install '.[lab]' "
                       "(after scripts/install-lab-deps.sh)")


def parse_latency(value: str) -> float:
    """'5ms', '5' or '0.5ms' -> milliseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms)?\s*", value.lower())
    if not m:
        raise click.BadParameter(f"give milliseconds like 5ms, got {value!r}", param_hint="--latency")
    return float(m.group(1))


# ---- CLI -----------------------------------------------------------------


def _split(value: str, n: int, what: str) -> list[str]:
    """'a,b,c' -> one item per phone; a single value applies to every phone."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise click.BadParameter(f"give 1 or {n} comma-separated values, got {len(items)}", param_hint=what)
    return items


@click.group("lab")
def lab() -> None:
    """Emulated phones (Google's adbd in network namespaces) for `llc deploy` without phones."""


_state_opt = click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True,
                          type=click.Path(file_okay=False), help="Where lab.json and the phones' folders live.")


@lab.command("up")
@click.option("--phones", "n", type=click.IntRange(1, 200), default=2, show_default=True)
@click.option("--cpu", default="1", show_default=True,
              help="Speed per phone as a share of one core, e.g. 1,0.5,0.25.")
@click.option("--rate", default="100mbit", show_default=True, help="Link rate per phone (tc syntax), e.g. 200mbit,50mbit.")
@click.option("--memory", default="2000", show_default=True,
              help="Memory limit per phone in MB (what `llc profile` reads), e.g. 1500,800,400.")
@click.option("--latency", default="0ms", show_default=True,
              help="One-way delay of each phone's link, e.g. 5ms or 5ms,20ms,20ms (phone to phone: both links).")
@click.option("--names", default=None, help="Phone names, comma-separated (default phone1, phone2, ...).")
@click.option("--adb-port", default=DEFAULT_ADB_PORT, show_default=True, help="The lab's private adb server port.")
@click.option("--name", "lab_name", default="llc", show_default=True, help="Prefix of the lab's bridge, namespaces, cgroup.")
@click.option("--subnet", default="10.77.0", show_default=True, help="First three octets of the lab network.")
@_state_opt
@one_line_errors
def up_cmd(n, cpu, rate, memory, latency, names, adb_port, lab_name, subnet, state_dir) -> None:
    """Bring up N phones and print where they are (also written to STATE_DIR/lab.json)."""
    cpus = [float(c) for c in _split(cpu, n, "--cpu")]
    rates = _split(rate, n, "--rate")
    try:
        mems = [int(m) for m in _split(memory, n, "--memory")]
    except ValueError:
        raise click.BadParameter(f"whole MB, got {memory!r}", param_hint="--memory") from None
    lats = [parse_latency(x) for x in _split(latency, n, "--latency")]
    name_list = _split(names, n, "--names") if names else [None] * n
    specs = [PhoneSpec(name=nm, cpu=c, rate=r, memory_mb=m, latency_ms=d)
             for nm, c, r, m, d in zip(name_list, cpus, rates, mems, lats)]
    the_lab = Lab(state_dir, adb_port=adb_port, name=lab_name, subnet=subnet)
    phones = the_lab.up(specs)
    click.echo(f"{'phone':<12} {'serial':<18} {'cpu (quota/period us, core)':<30} {'rate':<10} {'latency':<8} "
               f"/data/local/tmp is")
    for p in phones:
        click.echo(f"{p.name:<12} {p.serial:<18} {f'{p.cpu} ({p.cpu_quota_us}/{p.cpu_period_us}, {p.core})':<30} "
                   f"{p.rate:<10} {f'{p.latency_ms:g}ms':<8} {p.data_dir}")
    click.echo(f"state: {Path(state_dir) / 'lab.json'}   profile: {Path(state_dir) / 'devices.yaml'}")
    click.echo(f"adb:   export ADB_SERVER_SOCKET=tcp:localhost:{adb_port}   (or adb -P {adb_port} ...)")


@lab.command("cpu")
@click.argument("phone")
@click.argument("cpu", type=float)
@_state_opt
@one_line_errors
def cpu_cmd(phone, cpu, state_dir) -> None:
    """Set a running PHONE's speed to CPU (a share of one core): throttle it mid-run, or restore it."""
    p = Lab.load(state_dir).set_cpu(phone, cpu)
    click.echo(f"{p.name}: cpu {p.cpu:g} ({p.cpu_quota_us}/{p.cpu_period_us} us, core {p.core})")


@lab.command("status")
@_state_opt
@one_line_errors
def status_cmd(state_dir) -> None:
    """Show each phone: adbd alive, namespace present, adb state."""
    the_lab = Lab.load(state_dir)
    rows = the_lab.status()
    click.echo(f"adb server: tcp:localhost:{the_lab.adb_port}")
    for r in rows:
        click.echo("  ".join(f"{k}={v}" for k, v in r.items()))
    if any(r["adbd"] != "running" or r["adb"] != "device" for r in rows):
        sys.exit(1)


@lab.command("down")
@click.option("--name", "lab_name", default="llc", show_default=True, help="Prefix, used when there is no lab.json.")
@click.option("--adb-port", default=DEFAULT_ADB_PORT, show_default=True, help="Used when there is no lab.json.")
@_state_opt
@one_line_errors
def down_cmd(lab_name, adb_port, state_dir) -> None:
    """Remove every phone, namespace, veth, bridge, cgroup and the lab's adb server."""
    try:
        the_lab = Lab.load(state_dir)
    except LabError:
        the_lab = Lab(state_dir, adb_port=adb_port, name=lab_name)
    the_lab.down()
    click.echo("lab down")


if __name__ == "__main__":
    lab()
