"""A phone link's latency, in user space: every packet through the phone's eth0 waits a fixed time.

Why user space: this kernel has neither netem nor the fq qdisc (which would
honour a BPF-set departure time), so no qdisc can hold a packet back. What it
has is netfilter's NFQUEUE: iptables hands each packet to a process, which
gives the verdict when it likes. This process, started in the phone's network
namespace, accepts every packet `delay` after it arrived, in arrival order:
the fixed one-way latency of netem's `delay`, for both directions (the lab
queues packets in and out of eth0; tbf still shapes the rate after it).

No `--queue-bypass` on the rules: if this process dies, the phone is cut off
instead of silently losing its latency.

    python -m llc.lab.delay QUEUE_NUM DELAY_MS READY_FILE
"""

from __future__ import annotations

import collections
import select
import socket
import sys
import time
from pathlib import Path

from netfilterqueue import COPY_META, NetfilterQueue

QUEUE_LEN = 16384  # packets the kernel holds for us; 5 ms at 200 Mbit is ~100 full-size packets


def serve(queue_num: int, delay_s: float, ready: Path) -> None:
    """Accept each queued packet ``delay_s`` after it came, forever."""
    due: collections.deque = collections.deque()
    queue = NetfilterQueue()
    queue.bind(queue_num, lambda packet: due.append((time.monotonic() + delay_s, packet)),
               max_len=QUEUE_LEN, mode=COPY_META)
    sock = socket.fromfd(queue.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    ready.write_text("ready\n")
    while True:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else None
        if select.select([sock], [], [], wait)[0]:
            queue.run(block=False)
        now = time.monotonic()
        while due and due[0][0] <= now:
            due.popleft()[1].accept()


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) / 1000, Path(sys.argv[3]))
