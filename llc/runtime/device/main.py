"""The device's process: check the bundle, open the sockets, serve the stage until told to stop.

    python3 -m llc_runtime.main --manifest manifest.json      (what run.sh does)

- check every file of the manifest against its sha256, then load segment.onnx;
- bind a ROUTER (CURVE server; ZAP admits only the build's keys; no message over
  the manifest's ``max_message_bytes``) and connect a DEALER (CURVE client) to
  every peer this stage sends to;
- poll: hand each message to the stage, answer hello/ping/stats, run ready steps.

A prefill runs in a worker thread so the loop keeps answering pings during it;
a decode step (one token, short) runs on the loop's own thread between two
polls, which spares two thread hand-offs per step and hop.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .manifest import Manifest, read_manifest, verify_files
from .protocol import COORDINATOR, HELLO
from .stage import Stage, StepResult

log = logging.getLogger("llc.device")
EXPIRE_EVERY_S = 10.0


class AllowKeys:
    """ZAP credentials provider: admits exactly the build's CURVE public keys."""

    def __init__(self, publics: tuple[str, ...]):
        self.publics = {p.encode() for p in publics}

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.publics
        if not ok:
            log.warning("refused CURVE client %s", key.decode(errors="replace"))
        return ok


class Device:
    """The sockets and the loop around one Stage."""

    def __init__(self, folder: Path, m: Manifest):
        self.m = m
        self.coordinator: bytes | None = None  # routing id of whoever last said hello
        self.stage = Stage(folder, m, self._send)
        self.running = True

    def open(self) -> None:
        m = self.m
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 200)  # flush the last messages on stop, but never hold a stop up
        # ZAP must be up before the bind: without a handler libzmq admits any CURVE key.
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("llc.device.zap"))
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=AllowKeys(m.allowed_publics))
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.curve_server = True
        self.router.curve_publickey = m.keys.public.encode()
        self.router.curve_secretkey = m.keys.secret.encode()
        self.router.setsockopt(zmq.MAXMSGSIZE, m.max_message_bytes)  # a bigger one drops the connection
        self.router.bind(m.bind)
        self.peers: dict[str, zmq.Socket] = {}
        for name, peer in sorted(m.peers.items()):
            s = self.ctx.socket(zmq.DEALER)
            s.curve_publickey = m.keys.public.encode()
            s.curve_secretkey = m.keys.secret.encode()
            s.curve_serverkey = peer.public.encode()
            s.sndtimeo = 10000  # a peer that stopped reading must not freeze this loop (and its pongs)
            s.connect(peer.endpoint)
            self.peers[name] = s
        # The worker wakes the loop through an inproc pair after each run.
        self.wake_rx = self.ctx.socket(zmq.PAIR)
        self.wake_rx.bind("inproc://llc-wake")
        wake_tx = self.ctx.socket(zmq.PAIR)
        wake_tx.connect("inproc://llc-wake")
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.worker_busy = False
        self.worker = threading.Thread(target=self._work, args=(wake_tx,), name="ort", daemon=True)
        self.worker.start()
        log.info("stage %d/%d listening on %s, sends to %s", m.stage, m.num_stages, m.bind,
                 sorted(self.peers) or "nobody")

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=5)
        for s in [self.router, self.wake_rx, *self.peers.values()]:
            s.close()
        self.auth.stop()
        self.ctx.term()

    def _send(self, dest: str, frames: list[bytes]) -> None:
        if dest != COORDINATOR:
            self.peers[dest].send_multipart(frames)
        elif self.coordinator is not None:
            self.router.send_multipart([self.coordinator, *frames])
        else:
            log.warning("no coordinator said hello; dropping a message for it")

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_rx, zmq.POLLIN)
        parent = os.getppid() if os.environ.get("LLC_WATCH_PARENT") == "1" else None
        next_expiry = time.monotonic() + EXPIRE_EVERY_S
        while self.running:
            busy = self.worker_busy or self.stage.waiting
            for sock, _ in poller.poll(0 if self.stage.ready and not busy else 200):
                if sock is self.wake_rx:
                    while self.wake_rx.poll(0):
                        self.wake_rx.recv()
                    while not self.results.empty():
                        self.worker_busy = False
                        self._complete(self.results.get())
                else:
                    self._receive()
            self._dispatch()
            if self.stage.stopping:
                log.info("stop requested")
                self.running = False
            if time.monotonic() > next_expiry:
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
                for rid in self.stage.expire():
                    log.warning("request %d idle too long: freed", rid)
            if parent is not None and os.getppid() != parent:
                log.warning("parent process %d is gone; exiting", parent)
                self.running = False

    def _receive(self) -> None:
        while self.running:
            try:
                ident, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, reply = self.stage.handle(frames)
            if kind == HELLO:
                self.coordinator = ident
            if reply is not None:
                self.router.send_multipart([ident, *reply])

    def _dispatch(self) -> None:
        """Run the oldest ready step: a prefill in the worker, a decode step right here.

        One run at a time uses all intra-op threads; after a decode step the loop
        polls again (without waiting) before the next one, so pings and stops stay answered.
        """
        if self.worker_busy:
            return
        job = self.stage.next_job()
        if job is None:
            return
        if job.step == 0:
            self.worker_busy = True
            self.jobs.put(job)
        else:
            self._complete(self.stage.run(job))

    def _complete(self, result: StepResult) -> None:
        """Hand a step's result to the stage; whatever goes wrong there, the device keeps serving."""
        try:
            self.stage.complete(result)
        except Exception as e:
            log.exception("step of %s failed after it ran", result.job.rows)
            for rid, _ in result.job.rows:
                self.stage._error(f"{type(e).__name__}: {e}", rid)
                self.stage.end(rid, forward=True)

    def _work(self, wake: zmq.Socket) -> None:
        """Worker thread: runs prefills (onnxruntime releases the GIL) and wakes the loop."""
        while True:
            job = self.jobs.get()
            if job is None:
                wake.close()
                return
            result: StepResult = self.stage.run(job)
            self.results.put(result)
            wake.send(b"")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llc device: one pipeline stage")
    ap.add_argument("--manifest", default="manifest.json", help="path to manifest.json")
    args = ap.parse_args(argv)
    path = Path(args.manifest).resolve()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {path.parent.name} %(levelname)s %(message)s")
    try:
        manifest = read_manifest(path)
        verify_files(path.parent, manifest.files)
        device = Device(path.parent, manifest)
    except Exception as e:  # a bad or half-pushed bundle: one line, not a traceback
        print(f"llc device {path.parent.name}: refusing to start: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        log.info("signal %d: exiting", signum)
        device.running = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        device.open()
    except zmq.ZMQError as e:
        print(f"llc device {manifest.device}: cannot listen on {manifest.bind}: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # sockets and threads are half set up; nothing to flush, do not wait on them
    try:
        device.serve()
    finally:
        device.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
