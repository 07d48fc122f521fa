"""Phone lab: real adbd "phones" in namespaces, driven by the stock adb client.

These need root, adb and adbd (scripts/install-lab-deps.sh). They fail, never
skip, when those are missing: a lab that silently does not run would hide a
broken `llc deploy` path. The lab here uses its own name, subnet and adb port
so it never touches a lab a user has up (default llc / 10.78.0 / 5137).
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import lab_up
from llc.lab.phones import LabError, PhoneSpec, assign_cores, cpu_quota

pytestmark = pytest.mark.lab

NAME, SUBNET, ADB_PORT = "llct", "10.78.0", 5147
BUSY = (  # prints loop iterations done in 2 s of wall time, and the CPU seconds that took
    "import time\n"
    "t = time.time(); c = time.process_time(); n = 0\n"
    "while time.time() - t < 2.0: n += 1\n"
    "print(n, time.process_time() - c)\n"
)
BURSTS = (  # iterations per second of 40 bursts of 60000 iterations (a few ms) with 20 ms pauses
    "import time\n"
    "per = 60000; d = 0.0\n"
    "for _ in range(40):\n"
    "    s = time.time(); k = 0\n"
    "    while k < per: k += 1\n"
    "    d += time.time() - s; time.sleep(0.02)\n"
    "print(40 * per / d)\n"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    specs = [PhoneSpec(cpu=1.0, rate="100mbit", latency_ms=1.0), PhoneSpec(cpu=0.25, rate="20mbit", latency_ms=4.0)]
    with lab_up(tmp_path_factory.mktemp("lab"), specs, name=NAME, subnet=SUBNET, adb_port=ADB_PORT) as the_lab:
        yield the_lab


def test_phones_are_where_the_lab_says(lab):
    fast, slow = lab.phones
    assert (fast.serial, slow.serial) == (f"{SUBNET}.11:5555", f"{SUBNET}.12:5555")
    # a plain `adb -P PORT connect` from the host works (idempotent on a connected phone)
    out = subprocess.run(["adb", "-P", str(ADB_PORT), "connect", fast.serial],
                         capture_output=True, text=True, timeout=20)
    assert "connected to" in out.stdout
    devices = lab.adb("devices").stdout
    assert f"{fast.serial}\tdevice" in devices and f"{slow.serial}\tdevice" in devices


def test_push_and_shell(lab, tmp_path):
    phone = lab.phones[1]
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello phone\n" * 1000)
    lab.adb("push", str(src), "/data/local/tmp/hello.txt", serial=phone.serial)
    # the file lands in the phone's own folder, not in the other phone's
    with open(os.path.join(phone.data_dir, "hello.txt"), "rb") as f:
        assert f.read() == src.read_bytes()
    assert not os.path.exists(os.path.join(lab.phones[0].data_dir, "hello.txt"))
    out = lab.adb("shell", "wc -c < /data/local/tmp/hello.txt; hostname; cat /proc/self/cgroup",
                  serial=phone.serial).stdout
    assert out.split()[0] == "12000"
    assert "phone2" in out and f"/{NAME}-lab/phone2" in out
    # shell v2 carries the exit code back
    assert lab.adb("shell", "exit 7", serial=phone.serial, check=False).returncode == 7


def test_runtime_imports_in_shell(lab):
    out = lab.adb("shell", "python3 -c 'import numpy, onnxruntime, zmq; print(\"ok\")'",
                  serial=lab.phones[1].serial, timeout=120).stdout
    assert out.strip() == "ok"


@pytest.mark.alone
def test_slow_phone_is_slower_both_sustained_and_in_bursts(lab):
    """Work done by a busy loop in 2 s, and by bursts of 3 ms with 20 ms pauses: the 0.25 phone
    does about a quarter of the 1.0 phone's in both (a long-period quota would only slow the first)."""
    def work(phone, code):
        return float(lab.adb("shell", f"python3 -c '{code}'", serial=phone.serial, timeout=60).stdout.split()[0])

    fast, slow = lab.phones
    for what, code in (("sustained", BUSY), ("bursts", BURSTS)):
        # The median of three interleaved ratios. A Python loop on a throttled core also runs
        # with cold caches, and how much that costs varies from one lab to the next on this VM
        # (0.15-0.31 sustained, 0.27-0.39 in bursts, measured across CI runs). What this test
        # catches is a phone at about 1.0: no quota, or a budget-like one in bursts. The bound
        # sits between the two and does not pin the exact fraction, which is the VM's, not llc's.
        ratios = sorted(work(slow, code) / work(fast, code) for _ in range(3))
        print(f"{what}: 0.25 phone / 1.0 phone = {ratios[1]:.3f} (of {', '.join(f'{r:.3f}' for r in ratios)})")
        assert 0.13 <= ratios[1] <= 0.6, what
    assert {p.core for p in lab.phones} == {0, 1} or len(os.sched_getaffinity(0)) == 1


def test_cores_and_quotas():
    """Phones share a core only up to one core's worth; the quota period is the shortest for the share."""
    assert assign_cores([1.0, 0.5, 0.25, 0.25], [0, 1]) == [0, 1, 1, 1]
    assert assign_cores([0.25, 1.0, 0.5], [0, 1]) == [1, 0, 1]
    with pytest.raises(LabError, match="more than this machine's 2 core"):
        assign_cores([1.0, 1.0, 0.5], [0, 1])
    assert cpu_quota(0.25) == (1000, 4000) and cpu_quota(0.5) == (1000, 2000) and cpu_quota(1.0) == (1000, 1000)


def test_rate_limit_host_to_phone(lab):
    """tbf on the 20mbit phone's link: a host->phone TCP stream stays near 20 Mbit/s."""
    phone = lab.phones[1]
    recv = (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 6100)); s.listen(1); s.settimeout(20)\n"
        "c, _ = s.accept(); n = 0; t0 = None\n"
        "while True:\n"
        "    b = c.recv(65536)\n"
        "    if not b: break\n"
        "    t0 = t0 or time.time(); n += len(b)\n"
        "print(n * 8 / (time.time() - t0) / 1e6)\n"
    )
    lab.adb("shell", f"cat > /data/local/tmp/recv.py <<'EOF'\n{recv}EOF", serial=phone.serial)
    rx = subprocess.Popen(["adb", "-P", str(ADB_PORT), "-s", phone.serial, "shell",
                           "python3 /data/local/tmp/recv.py"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                sock = socket.create_connection((phone.address, 6100), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        end = time.monotonic() + 1.5
        with sock:
            while time.monotonic() < end:
                sock.sendall(b"x" * 65536)
        mbit = float(rx.communicate(timeout=30)[0].split()[-1])
    finally:
        rx.kill()
        rx.wait(timeout=10)
    print(f"host->phone2 {mbit:.1f} Mbit/s (tbf 20mbit)")
    assert 12 <= mbit <= 24


CONNECT = (  # median TCP connect time (one round trip) in ms from this phone to HOST:PORT
    "import socket, statistics, sys, time\n"
    "ts = []\n"
    "for _ in range(15):\n"
    "    t = time.perf_counter(); socket.create_connection((sys.argv[1], 5555), timeout=5).close()\n"
    "    ts.append(time.perf_counter() - t)\n"
    "print(statistics.median(ts) * 1000)\n"
)


@pytest.mark.alone  # absolute round trips: another suite's load would stretch them
def test_link_latency(lab):
    """Each phone's link delays its packets both ways: host to phone is 2x its latency per round trip,
    phone to phone 2x the sum of both (1 ms and 4 ms here); the profile says so too."""
    fast, slow = lab.phones
    def rtt_from_host(phone):
        ts = []
        for _ in range(15):
            t = time.perf_counter()
            socket.create_connection((phone.address, 5555), timeout=5).close()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1000
    lab.adb("shell", f"cat > /data/local/tmp/connect.py <<'EOF'\n{CONNECT}EOF", serial=fast.serial)
    between = float(lab.adb("shell", f"python3 /data/local/tmp/connect.py {slow.address}",
                            serial=fast.serial).stdout.split()[-1])
    to_fast, to_slow = rtt_from_host(fast), rtt_from_host(slow)
    print(f"round trips: host-phone1 {to_fast:.2f} ms, host-phone2 {to_slow:.2f} ms, phone1-phone2 {between:.2f} ms")
    assert 2.0 <= to_fast <= 5.0 and 8.0 <= to_slow <= 12.0 and 10.0 <= between <= 15.0
    assert all(r["delay"] == "running" for r in lab.status())
    link = yaml.safe_load((lab.state_dir / "devices.yaml").read_text())["network"]["links"][0]
    assert link["latency_ms"] == pytest.approx(5.2)


def test_down_leaves_nothing(lab):
    """Last in this file: takes the shared lab down and looks for leftovers."""
    phone = lab.phones[1]
    # a process started through adb shell must die with the lab (no pid namespace: its pid is the host's)
    sleeper = int(lab.adb("shell", "nohup sleep 600 >/dev/null 2>&1 & echo $!", serial=phone.serial).stdout)
    pids = [p.pid for p in lab.phones] + [p.delay_pid for p in lab.phones] + [sleeper]
    lab.down()

    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "lab processes left"
    # no adbd of this lab anywhere (another lab, e.g. a user's, may run its own)
    left = []
    for pid in subprocess.run(["pgrep", "-x", "adbd"], capture_output=True, text=True, timeout=10).stdout.split():
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if f"/{NAME}-lab" in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert left == [], f"adbd processes left: {left}"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"{NAME}-" not in netns
    links = os.listdir("/sys/class/net")
    assert not [n for n in links if n.startswith(NAME)], links
    assert not os.path.exists(f"/sys/fs/cgroup/cpu/{NAME}-lab")
    with pytest.raises(OSError):  # the lab's adb server is gone too
        socket.create_connection(("127.0.0.1", ADB_PORT), timeout=2).close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
