"""`llc profile`, `llc deploy` and `llc run` against the phone lab (real adbd "phones").

Three phones with different CPU quotas and link rates: profile them, compile a
tiny llama for the measured profile, deploy over adb, generate greedily and
compare with the unsplit model, stop, and check nothing is left. Like
test_lab.py these fail, never skip, without root/adb/adbd, and use their own
lab name, subnet and adb port so a user's lab (llc / 10.77.0 / 5137) is untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import lab_up, machine_lock
from llc.bundle import schema
from helpers import Reference, write_tokenizer
from llc.lab.phones import PhoneSpec
from llc.profile import load_profile
from llc.runtime.device import PACKAGE
from llc.targets.adb import Adb, AdbTarget, Phone, check_runtime, connect, runtime_problem
from llc.targets.base import TargetError, make_target
from models import small_llama, tiny_llama

NAME, SUBNET, ADB_PORT = "llcd", "10.79.0", 5157
SPECS = [PhoneSpec(cpu=1.0, rate="100mbit", memory_mb=1500), PhoneSpec(cpu=0.5, rate="50mbit", memory_mb=800),
         PhoneSpec(cpu=0.25, rate="40mbit", memory_mb=600)]
REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["w5 w6 w7", "w40", "w100 w101 w102 w103 w104 w105 w106", "w7 w8 w9 w200 w201 w202 w203 w3 w4"]
NEW_TOKENS = 12


def llc(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; no ADB_SERVER_SOCKET leaks in from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "ADB_SERVER_SOCKET"}
    return subprocess.run([sys.executable, "-m", "llc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def lab_launchers(phone: str = "*") -> list[int]:
    """Pids of device runtimes (``python -m llc_runtime.main``, what run.sh execs) in this lab's
    cgroups: that is, on its phones, or on ``phone``."""
    pids = []
    for procs in Path(f"/sys/fs/cgroup/cpu/{NAME}-lab").glob(f"{phone}/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                if f"{PACKAGE}.main".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory.mktemp("adb-lab"), SPECS, name=NAME, subnet=SUBNET, adb_port=ADB_PORT) as the_lab:
        yield the_lab
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"{NAME}-" not in netns, netns
    assert lab_launchers() == []


@pytest.fixture(scope="module")
def measured(lab, tmp_path_factory) -> Path:
    """`llc profile` of the lab's phones, from an input without memory_mb/gflops (they get measured)."""
    tmp = tmp_path_factory.mktemp("profile")
    doc = yaml.safe_load((lab.state_dir / "devices.yaml").read_text())
    for d in doc["devices"]:
        del d["memory_mb"], d["gflops"]
    del doc["network"]["links"]
    doc["workload"] = {"prompt_tokens": 16, "max_context": 128}
    phones = tmp / "phones.yaml"
    phones.write_text(yaml.safe_dump(doc, sort_keys=False))
    out, raw = tmp / "measured.yaml", tmp / "measured.json"
    t0 = time.monotonic()
    with machine_lock(exclusive=True):  # speeds are compared: no other test session's work on the cores
        proc = llc("profile", phones, "-o", out, "--json", raw, "--adb-port", ADB_PORT,
                   "--seconds", 1.5, "--net-seconds", 1.5)
    assert proc.returncode == 0, proc.stderr
    print(f"\nllc profile took {time.monotonic() - t0:.1f} s\n{proc.stderr}")
    return out


@pytest.fixture(scope="module")
def build(measured, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adb-build") / "build"
    proc = llc("compile", tiny_llama("legacy"), "--devices", measured, "--stages", 3, "--requests", 4, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    write_tokenizer(out / "tokenizer.json", 256)
    return out


def record(build: Path) -> dict:
    return dataclasses.asdict(schema.read(build, schema.DEPLOY))


def stages(build: Path) -> list[str]:
    return schema.open_build(build).devices


# --- llc profile ---------------------------------------------------------------------------------


@pytest.mark.lab
def test_profile_ranks_phones_and_measures_links(lab, measured):
    profile = load_profile(measured)  # what compile accepts
    by_name = {d.name: d for d in profile.devices}
    assert [(d.name, d.serial, d.address, d.target, d.threads) for d in profile.devices] == \
        [(p.name, p.serial, p.address, "adb", 1) for p in lab.phones]
    assert profile.workload.prompt_tokens == 16 and profile.workload.max_context == 128
    fast, mid, slow = (by_name[p.name].gflops for p in lab.phones)
    print(f"decode GFLOP/s: 1.0 CPU {fast:.2f}, 0.5 CPU {mid:.2f}, 0.25 CPU {slow:.2f}; "
          f"ratios {mid / fast:.3f} and {slow / fast:.3f}")
    # Under host load the 0.5 phone can measure no faster than the 0.25 one: a CI run, in an hour when
    # this VM lost 12% of its CPU to steal, measured 1.171 against 1.173 GFLOP/s (0.28 and 0.30 CPU
    # s/s; the full phone 2.56 at 0.53). So those two may tie within 10%; the full phone must stand apart.
    assert fast > mid >= 0.9 * slow and fast > slow
    assert all(d.gflops_prefill > d.gflops and d.memory_gbps > 0 for d in profile.devices)
    assert all(r.gflops_prefill > 0 and r.memory_gbps > 0 for d in profile.devices for r in (d.int8, d.int4))
    assert by_name[lab.phones[0].name].int4.gflops_prefill > by_name[lab.phones[2].name].int4.gflops_prefill
    # a 0.25 CPU quota measures 0.25-0.34 of the free phone on most days, but up to 0.48 on some (idle
    # host, the same code: CFS lets a quota'd phone run over its share at times); a quota that acts as a
    # budget measures near 1. While another suite loads the host, the quota'd phone loses more than the free
    # one (0.17 seen). What this asserts: a slower CPU, at least twice as slow, and not stalled.
    assert 0.1 <= slow / fast <= 0.55
    for d, spec in zip(profile.devices, SPECS):  # each phone's memory cgroup: its limit less what is in use
        print(f"{d.name}: {d.memory_mb} MB of its {spec.memory_mb} MB limit")
        assert spec.memory_mb - 150 < d.memory_mb <= spec.memory_mb
    rates = {p.name: p.rate_bps / 1e6 for p in lab.phones}
    assert len(profile.network.links) == 3
    for (a, b), link in profile.network.links.items():
        tbf = min(rates[a], rates[b])  # a phone-to-phone stream crosses both phones' tbf limits
        print(f"{a}-{b}: {link.bandwidth_mbps:.1f} Mbit/s (tbf {tbf:.0f}), one-way {link.latency_ms:.3f} ms")
        assert 0.75 * tbf <= link.bandwidth_mbps <= 1.02 * tbf
        assert 0 < link.latency_ms < 5


@pytest.mark.alone
def test_slow_phone_runs_decode_steps_proportionally_slower(lab, measured, tmp_path):
    """The launchers' own ms per decode step, a model of 32 equal layers split in two halves over the
    1.0 phone and the 0.25 phone: each waits for the other, as pipeline stages do, and the slow phone is
    0.2-0.3x as fast, as the profile says."""
    doc = yaml.safe_load(measured.read_text())
    doc["devices"] = [d for d in doc["devices"] if d["name"] in ("phone1", "phone3")]
    doc["network"]["links"] = [x for x in doc["network"].get("links", []) if set(x["between"]) == {"phone1", "phone3"}]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "split.yaml").write_text(yaml.safe_dump({"stages": [
        {"device": "phone1", "blocks": ["embed", "layer 15"]}, {"device": "phone3", "blocks": ["layer 16", "head"]}]}))
    build = tmp_path / "build"
    proc = llc("compile", small_llama(), "--devices", tmp_path / "two.yaml", "--split", tmp_path / "split.yaml",
               "-o", build, "-q")
    assert proc.returncode == 0, proc.stderr
    write_tokenizer(build / "tokenizer.json", 256)
    try:
        assert llc("deploy", build, "--adb-port", ADB_PORT).returncode == 0
        proc = llc("run", build, "--prompt", "w5 w6 w7", "--max-new-tokens", 60, "--json", tmp_path / "r.json")
        assert proc.returncode == 0, proc.stderr
    finally:
        llc("stop", build)
    ms = {s["device"]: s["ms_per_decode_step_median"] for s in json.loads((tmp_path / "r.json").read_text())["summary"]["stages"]}
    print(f"ms per decode step of 16 layers: 1.0 phone {ms['phone1']:.2f}, 0.25 phone {ms['phone3']:.2f}; "
          f"speed ratio {ms['phone1'] / ms['phone3']:.3f}")
    # 0.27 on most days; 0.32-0.42 on some (idle host, the same code; not yet explained), and 0.308 with
    # a second test suite loading the 1.0 phone's core: at least about twice as slow, never a budget
    # that short steps stay under (near 1)
    assert 0.2 <= ms["phone1"] / ms["phone3"] <= 0.55


# --- llc deploy / run / stop ----------------------------------------------------------------------


@pytest.mark.lab
def test_deploy_run_matches_unsplit_then_stop(lab, build, tmp_path):
    phones = {p.name: p for p in lab.phones}
    first = llc("deploy", build, "--adb-port", ADB_PORT)
    assert first.returncode == 0, first.stderr
    rec = record(build)
    bundle_bytes = sum(f.stat().st_size for f in (build / "devices").rglob("*") if f.is_file())
    assert rec["pushed_bytes"] == bundle_bytes
    pids = {name: d["pid"] for name, d in rec["devices"].items()}
    for name, pid in pids.items():  # each launcher runs on its phone: in that phone's cgroup
        assert alive(pid)
        assert f"/{NAME}-lab/{name}" in Path(f"/proc/{pid}/cgroup").read_text()
        assert (Path(phones[name].data_dir) / "llc" / rec["build_id"] / "launcher.pid").read_text().strip() == str(pid)

    again = llc("deploy", build, "--adb-port", ADB_PORT)
    assert again.returncode == 0, again.stderr
    assert record(build)["pushed_bytes"] == 0 and "0 bytes pushed" in again.stdout
    assert {n: d["pid"] for n, d in record(build)["devices"].items()} == pids  # left running, not restarted
    print(f"deploy pushed {bundle_bytes} bytes the first time, {record(build)['pushed_bytes']} the second")

    status = llc("status", build)  # no --adb-port: the deploy record knows the lab's adb server
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("launcher=running") == 3

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.json"
    run = llc("run", build, "--prompts", prompts, "--max-new-tokens", NEW_TOKENS, "--concurrency", 2, "--json", out)
    assert run.returncode == 0, run.stderr
    assert "attaching" in run.stderr
    reference = Reference(tiny_llama("legacy"))
    eos = set(schema.open_build(build).manifest(stages(build)[-1]).eos_token_ids)
    results = json.loads(out.read_text())["results"]
    for r in results:
        assert r["tokens"] == reference.greedy(r["prompt_ids"], NEW_TOKENS, eos), r["prompt"]
    print(f"llc run on the phones: {sum(len(r['tokens']) for r in results)} tokens, all equal to the unsplit model")
    assert all(alive(p) for p in pids.values())  # attached: the launchers keep running

    logs = llc("logs", build, stages(build)[-1])
    assert logs.returncode == 0 and "listening on tcp://0.0.0.0:" in logs.stdout

    stop = llc("stop", build)
    assert stop.returncode == 0, stop.stderr
    assert not [p for p in pids.values() if alive(p)]
    assert lab_launchers() == []
    assert not any((Path(p.data_dir) / "llc" / rec["build_id"] / "launcher.pid").exists() for p in lab.phones)
    status = llc("status", build)
    assert status.returncode == 1 and status.stdout.count("launcher=stopped") == 3
    assert llc("stop", build).returncode == 0  # idempotent


@pytest.mark.lab
def test_interrupted_push_is_resumed(lab, build):
    """A file cut short or missing on a phone is pushed again, and only that file."""
    head, mid, tail = stages(build)
    build_id = schema.read(build, schema.PLAN).build_id
    dirs = {p.name: Path(p.data_dir) / "llc" / build_id for p in lab.phones}
    weights = min((build / "devices" / head).glob("w-*.bin")).name
    data = dirs[head] / weights
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # as if the push was interrupted
    (dirs[mid] / "manifest.json").unlink()
    try:
        proc = llc("deploy", build, "--adb-port", ADB_PORT)
        assert proc.returncode == 0, proc.stderr
        pushed = {n: list(d["pushed_files"]) for n, d in record(build)["devices"].items()}
        assert pushed == {head: [weights], mid: ["manifest.json"], tail: []}
        assert record(build)["pushed_bytes"] == (build / "devices" / head / weights).stat().st_size + \
            (build / "devices" / mid / "manifest.json").stat().st_size
    finally:
        assert llc("stop", build).returncode == 0
    assert lab_launchers() == []


@pytest.mark.lab
def test_run_with_target_adb_deploys_and_stops(lab, build, tmp_path):
    """`llc run --target adb` without a deploy: starts the phones, generates, stops them again."""
    env_server = f"tcp:localhost:{ADB_PORT}"
    proc = subprocess.run([sys.executable, "-m", "llc.cli", "run", str(build), "--target", "adb",
                           "--prompt", PROMPTS[0], "--max-new-tokens", "5"], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={**os.environ, "ADB_SERVER_SOCKET": env_server})
    assert proc.returncode == 0, proc.stderr
    assert "starting 3 device(s) with target adb" in proc.stderr
    assert lab_launchers() == []
    assert record(build)["running"] is False


@pytest.mark.lab
def test_a_phone_whose_launcher_is_killed_is_planned_around(lab, build, monkeypatch):
    """`llc run --target adb` with 4 requests in flight; one phone's launcher is SIGKILLed mid-run: the
    others get a new plan over adb, and every request ends with the unsplit model's greedy tokens."""
    from llc.runtime.device.sampling import SamplingParams
    from llc.runtime.run import generate

    monkeypatch.setenv("ADB_SERVER_SOCKET", f"tcp:localhost:{ADB_PORT}")
    victim = stages(build)[1]
    seen: list[int] = []

    def on_token(r, token, done):
        seen.append(token)
        if len(seen) == 6:
            for pid in lab_launchers(victim):
                os.kill(pid, signal.SIGKILL)

    tok = {p: [1] + [int(w[1:]) for w in p.split()] for p in PROMPTS}  # the test tokenizer: <s> wN -> N
    out = generate(build, list(tok.values()), SamplingParams(max_new_tokens=24), 4, on_token, target_name="adb",
                   timeout=120)
    (f,) = out.failovers
    assert f.device == victim and victim not in f.devices_left and len(f.devices_left) == 2
    reference = Reference(tiny_llama("legacy"))
    eos = set(schema.open_build(build).manifest(stages(build)[-1]).eos_token_ids)
    for prompt, r in zip(tok.values(), out.results):
        assert r.tokens == reference.greedy(prompt, 24, eos), prompt
    print(f"phone {victim} lost: re-planned in {f.replan_s:.1f} s, {f.lost_s:.1f} s to the next token")
    assert lab_launchers() == []


@pytest.mark.lab
@pytest.mark.alone  # a move needs the throttled phone slower relative to the others, whatever else runs
def test_a_phone_throttled_mid_run_is_balanced_away_with_the_same_tokens(lab, measured, tmp_path, monkeypatch):
    """Mid-generation, the fastest phone's CPU quota drops to a quarter core (`llc lab cpu`), as a phone
    that heats up: the balancer moves layers off it, the phones restart over adb with the new plan
    (no weights pushed: the moved layers were there as spares), and every request ends with the
    unsplit model's greedy tokens."""
    from llc.runtime.balance import Balancer
    from llc.runtime.device.sampling import SamplingParams
    from llc.runtime.run import generate

    monkeypatch.setenv("ADB_SERVER_SOCKET", f"tcp:localhost:{ADB_PORT}")
    build = tmp_path / "build"
    # one request per step: the run outlasts the windows, the re-plan and the restart on a loaded host too
    proc = llc("compile", small_llama(), "--devices", measured, "--stages", 3, "--requests", 4, "--objective",
               "throughput", "--max-context", 256, "--max-batch", 1, "-o", build, "-q")
    assert proc.returncode == 0, proc.stderr
    write_tokenizer(build / "tokenizer.json", 256)
    victim = max(schema.read(build, schema.PLAN).stages, key=lambda s: s.blocks[1] - s.blocks[0]).device
    assert victim == "phone1"  # the full-core phone holds the most layers
    seen: list[int] = []

    def on_token(r, token, done):
        seen.append(token)
        if len(seen) == 8:
            assert llc("lab", "cpu", victim, 0.25, "--state-dir", lab.state_dir).returncode == 0

    prompts = [[1] + [int(w[1:]) for w in p.split()] for p in PROMPTS]
    balancer = Balancer(build, build, min_interval_s=2.0, window_steps=8)
    try:
        out = generate(build, prompts, SamplingParams(max_new_tokens=160), 4, on_token, target_name="adb",
                       timeout=120, balancer=balancer)
    finally:
        lab.set_cpu(victim, 1.0)
    assert out.moves and out.moves[0].reason.startswith(f"{victim} ran") and "slower" in out.moves[0].reason
    blocks = {s.device: s.blocks[1] - s.blocks[0] for s in schema.read(out.build, schema.PLAN).stages}
    before = {s.device: s.blocks[1] - s.blocks[0] for s in schema.read(build, schema.PLAN).stages}
    assert blocks.get(victim, -1) < before[victim]
    moved = record(out.build)["devices"]  # the re-plan's deploy: its layers were on the phones as spares
    assert not [f for d in moved.values() for f in d["pushed_files"] if f.startswith("w-")], moved
    assert any(d["linked_files"] for d in moved.values())
    reference = Reference(small_llama())
    eos = set(schema.open_build(build).manifest(stages(build)[-1]).eos_token_ids)
    for prompt, r in zip(prompts, out.results):
        assert r.tokens == reference.greedy(prompt, 160, eos), prompt
    print("\n".join(m.line() + f"; {m.lost_s:.1f} s to the next token" for m in out.moves))
    assert lab_launchers() == []


def test_lab_cpu_names_a_phone_it_does_not_have(tmp_path):
    (tmp_path / "lab.json").write_text(json.dumps({"name": "x", "subnet": "10.9.9", "bridge": "xbr0",
                                                   "adb_port": 5999, "phones": []}))
    proc = llc("lab", "cpu", "phone9", 0.5, "--state-dir", tmp_path)
    assert proc.returncode != 0 and "no phone 'phone9' in this lab" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.lab
def test_no_space_left_names_the_device(lab, build):
    """A full /data/local/tmp (a 16 KB tmpfs over the bundle folder, inside the phone) is named, not a traceback."""
    tail = stages(build)[-1]
    phone = next(p for p in lab.phones if p.name == tail)
    folder = f"/data/local/tmp/llc/{schema.read(build, schema.PLAN).build_id}"
    lab.adb("shell", f"mkdir -p {folder} && mount -t tmpfs -o size=16k tmpfs {folder}", serial=phone.serial)
    try:
        proc = llc("deploy", build, "--adb-port", ADB_PORT)
    finally:
        lab.adb("shell", f"umount {folder}", serial=phone.serial)
    assert proc.returncode == 1
    assert f"llc: device '{tail}': no space left on the device" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert lab_launchers() == []  # nothing started when one phone cannot take its bundle


@pytest.mark.lab
def test_missing_runtime_says_what_to_install(lab):
    adb = Adb.for_port(ADB_PORT)
    phone = Phone("phone3", lab.phones[2].serial)
    with pytest.raises(TargetError, match=r"device 'phone3': no python3\.99 on the device.*pkg install python"):
        check_runtime(adb, phone, python="python3.99")
    with pytest.raises(TargetError, match=r"python3 cannot import llc-no-such-pkg \(ModuleNotFoundError\); install "
                                          r"them \(on Termux: pkg install python python-numpy; pip install"):
        check_runtime(adb, phone, modules={"numpy": "numpy", "llc_no_such_module": "llc-no-such-pkg"})
    check_runtime(adb, phone)  # the lab's phones have the runtime


@pytest.mark.lab
def test_dead_adbd_is_named_before_anything_starts(lab, build):
    """Last: it kills a phone's adbd. The deploy fails at once, naming that phone."""
    victim = lab.phones[1]
    os.kill(victim.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    proc = llc("deploy", build, "--adb-port", ADB_PORT)
    took = time.monotonic() - t0
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"llc: device '{victim.name}': cannot reach {victim.serial}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert took < 15
    assert lab_launchers() == []


# --- without the lab: adb states a lab cannot produce ------------------------------------------------


def fake_adb(tmp_path: Path, devices_output: str) -> Adb:
    """An `adb` that lists canned devices and fails to connect (what adb does for a phone that is away)."""
    exe = tmp_path / "adb"
    exe.write_text("#!/bin/sh\n"
                   "for a; do last=$a; done\n"
                   "case \" $* \" in\n"
                   f"  *' devices '*) printf '%s' '{devices_output}' ;;\n"
                   "  *' connect '*) echo \"failed to connect to '$last': Connection refused\" ;;\n"
                   "esac\nexit 0\n")
    exe.chmod(0o755)
    return Adb(exe=str(exe))


@pytest.mark.parametrize("state,message", [
    ("unauthorized", "R58M12345 is unauthorized: unlock the phone and accept the 'Allow USB debugging' prompt"),
    ("offline", "R58M12345 is offline: reconnect it"),
    (None, "R58M12345 is not listed by `adb devices`: plug it in and enable USB debugging"),
])
def test_adb_states_are_one_line_errors(tmp_path, state, message):
    listing = "List of devices attached\n" + (f"R58M12345\t{state}\n" if state else "") + "\n"
    with pytest.raises(TargetError) as e:
        connect(fake_adb(tmp_path, listing), Phone("pixel", "R58M12345"))
    assert str(e.value).startswith(f"device 'pixel': {message}")
    assert "\n" not in str(e.value)


def test_network_phone_that_does_not_answer(tmp_path):
    with pytest.raises(TargetError, match=r"device 'p': cannot reach 10\.9\.9\.9:5555 \(failed to connect"):
        connect(fake_adb(tmp_path, "List of devices attached\n\n"), Phone("p", "10.9.9.9:5555"))


def test_runtime_problem_messages():
    assert runtime_problem("llc-ok\n") is None
    assert "pip install onnxruntime pyzmq" in runtime_problem("llc-no-python\n")
    assert runtime_problem("llc-missing: onnxruntime (ModuleNotFoundError), pyzmq (ImportError)\n").startswith(
        "python3 cannot import onnxruntime (ModuleNotFoundError), pyzmq (ImportError); install them")


def test_adb_target_is_registered():
    assert isinstance(make_target("adb"), AdbTarget)
