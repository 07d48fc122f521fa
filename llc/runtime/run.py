"""`llc run BUILD_DIR`: start a build's devices, generate, report timings, stop them.

Exit codes: 0 done; 1 a device died, hung or failed (the message names it);
2 bad input (missing prompt, build or tokenizer); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click

from llc.bundle import schema
from llc.errors import DeviceError, LlcError, one_line_errors
from llc.progress import to_stderr
from llc.runtime.chat import ChatTemplate
from llc.runtime.coordinator import (Coordinator, DeviceFailure, RequestResult, StageStats, TextStream,
                                     load_tokenizer)
from llc.runtime.device.sampling import SamplingParams
from llc.runtime.balance import Balancer, Move, Rebalance
from llc.runtime.failover import Failover, without
from llc.targets.base import Target, make_target

MIB = 1 << 20


def check_requests(build: schema.Build, head: schema.Manifest, prompts: list[list[int]], max_new_tokens: int,
                   concurrency: int) -> None:
    """Refuse up front what the devices would refuse later: a request that cannot fit the build."""
    for i, p in enumerate(prompts):
        if not p:
            raise LlcError(None, f"prompt {i + 1} is empty (no tokens)")
        if len(p) + max_new_tokens > head.max_context:
            raise LlcError(None, f"prompt {i + 1} ({len(p)} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                                 f"the build's max context of {head.max_context} tokens (compile with a larger "
                                 f"--max-context)")
    if concurrency > head.max_requests:
        raise LlcError(None, f"--concurrency {concurrency} exceeds the {head.max_requests} request(s) the build "
                             f"reserved KV cache for (compile with --requests {concurrency})")


def _prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise LlcError(None, "give exactly one of --prompt or --prompts FILE")
    if prompt is not None:
        return [prompt]
    lines = [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise LlcError(prompts_file, "no prompts (one per line)")
    return lines


def _median_ms(stage: StageStats, since: float, prefill: bool = False) -> float | None:
    """Median ms of the decode steps (step >= 1), or of the prefills, this run made: robust to a
    hiccup of the host."""
    ms = sorted((e[3] - e[2]) * 1000 for e in stage.events
                if (e[1] == 0 if prefill else e[1] >= 1) and e[2] >= since and e[4] == 0)
    return ms[len(ms) // 2] if ms else None


def summarize(results: list[RequestResult], stages: list[StageStats], wall_s: float, since: float,
              plan: schema.PlanDoc | None = None) -> dict:
    """Timings in one dict: printed as text, written as JSON (``since``: the run's start, device clock).

    Each stage carries the plan's prediction next to what its device measured
    (compute ms per decode step, resident memory), so anyone can check the
    cost model on their own devices.
    """
    planned = {s.device: s for s in plan.stages} if plan else {}
    tokens = sum(len(r.tokens) for r in results)
    ttft = [r.ttft_ms for r in results if r.ttft_ms is not None]
    mspt = [r.ms_per_token for r in results if r.ms_per_token is not None]
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_ms_mean": sum(ttft) / len(ttft) if ttft else None,
        "ms_per_token_mean": sum(mspt) / len(mspt) if mspt else None,
        # the plan's tokens/s with as many requests in flight as it reserved KV cache for
        "predicted_tokens_per_s": plan.predicted.tokens_per_s_batched if plan else None,
        "planned_requests": plan.workload.requests_in_flight if plan else None,
        "stages": [
            {"device": s.device, "stage": s.stage, "prefill_ms": s.prefill_ms, "prefill_steps": s.prefill_steps,
             "decode_ms": s.decode_ms, "decode_steps": s.decode_steps, "ms_per_decode_step": s.ms_per_decode_step,
             "decode_rows": s.decode_rows, "mean_batch": s.mean_batch,
             "ms_per_decode_step_median": _median_ms(s, since),
             "predicted_ms_per_decode_step": planned[s.device].compute_ms_decode if s.device in planned else None,
             "ms_per_prefill_median": _median_ms(s, since, prefill=True),
             # at the workload's prompt_tokens: compare with prompts of about that length
             "predicted_ms_per_prefill": planned[s.device].compute_ms_prefill if s.device in planned else None,
             "rss_mb": s.rss_bytes / MIB, "peak_rss_mb": s.peak_rss_bytes / MIB,
             "predicted_memory_mb": planned[s.device].memory_bytes / MIB if s.device in planned else None}
            for s in stages
        ],
        # Everything sent on a hop (prefill included), also per generated token.
        "hops": {
            f"{s.device}->{peer}": {"bytes": n, "bytes_per_token": n / tokens if tokens else None}
            for s in stages for peer, n in sorted(s.bytes_sent.items())
        },
    }


def _print_summary(summary: dict) -> None:
    def ms(x):
        return "-" if x is None else f"{x:.1f} ms"

    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    echo(f"{summary['requests']} request(s), {summary['tokens']} tokens in {summary['wall_s']:.2f} s "
         f"({summary['tokens_per_s'] or 0:.1f} tok/s); time to first token {ms(summary['ttft_ms_mean'])}, "
         f"{ms(summary['ms_per_token_mean'])}/token")
    if summary.get("predicted_tokens_per_s"):
        echo(f"  the plan predicts {summary['predicted_tokens_per_s']:.1f} tok/s with "
             f"{summary['planned_requests']} request(s) in flight")
    for s in summary["stages"]:
        predicted = s["predicted_ms_per_decode_step"]
        echo(f"  stage {s['stage']} {s['device']}: decode {ms(s['ms_per_decode_step_median'])}/step "
             f"(predicted {ms(predicted)}; {s['decode_steps']} steps, {s['mean_batch'] or 0:.1f} requests each), "
             f"prefill {s['prefill_ms']:.1f} ms total, memory {s['peak_rss_mb']:.0f} MB peak "
             f"(planned {s['predicted_memory_mb'] or 0:.0f} MB)")
    for hop, h in summary["hops"].items():
        per = "" if h["bytes_per_token"] is None else f" ({h['bytes_per_token']:.0f} B/token)"
        echo(f"  {hop}: {h['bytes']} B{per}")


@click.command("run")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="One prompt; its text is streamed to stdout as it is generated.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one prompt per line.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 means greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 means off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--seed", type=int, default=None, help="Makes sampling repeatable (per request).")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1),
              help="Requests kept in flight at once, to fill the pipeline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write texts, tokens and timings here.")
@click.option("--timeline", "timeline_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the pipeline timeline (one row per device, one bar per step) as HTML.")
@click.option("--target", "target_name", default=None, help="How to start the devices (default: from the plan).")
@click.option("--attach", is_flag=True, help="Devices are already running (e.g. after `llc deploy`): "
                                             "do not start or stop them.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the devices to start.")
@click.option("--chat", is_flag=True, help="Send each prompt as a user message in the model's chat template.")
@click.option("--no-failover", is_flag=True, help="A lost device ends the run, instead of a re-plan over the "
                                                  "devices left that resumes every request.")
@click.option("--no-balance", is_flag=True, help="Keep the plan when a device turns slower than it assumed, "
                                                 "instead of moving layers off it.")
@one_line_errors
def run(build_dir: Path, prompt: str | None, prompts_file: Path | None, max_new_tokens: int, temperature: float,
        top_k: int, top_p: float, seed: int | None, concurrency: int, json_path: Path | None,
        target_name: str | None, attach: bool, timeout: float, timeline_path: Path | None = None,
        chat: bool = False, no_failover: bool = False, no_balance: bool = False) -> None:
    """Generate text with the devices of BUILD_DIR (the output of `llc compile`)."""
    texts = _prompts(prompt, prompts_file)
    build = schema.open_build(build_dir)
    head = build.manifest(build.devices[0])
    tok = load_tokenizer(build_dir)  # before anything starts: a build without one fails at once
    if chat:
        template = ChatTemplate.of_build(build_dir, tok)
        if template is None:
            raise LlcError(build_dir, "the build has no chat template (none was beside the model)")
        prompts = [tok.encode(template.render([{"role": "user", "content": t}]), add_special_tokens=False).ids
                   for t in texts]
    else:
        prompts = [tok.encode(t).ids for t in texts]
    check_requests(build, head, prompts, max_new_tokens, concurrency)
    try:
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    except ValueError as e:
        raise LlcError(None, str(e)) from None
    streams = [TextStream(tok) for _ in prompts]
    single = len(prompts) == 1

    def on_token(r: RequestResult, token: int, done: bool) -> None:
        piece = streams[r.index].push(token)
        if single:
            click.echo(piece, nl=done)
        elif done:
            click.echo(f"=== [{r.index}] {texts[r.index]}\n{streams[r.index].text}")

    balancer = None if no_balance else Balancer(build_dir, build_dir, say=to_stderr)
    out = generate(build_dir, prompts, params, concurrency, on_token, target_name, attach, timeout,
                   failover=not no_failover, balancer=balancer)
    results, stage_stats, wall, started, failovers = out.results, out.stats, out.wall_s, out.started, out.failovers
    for f in failovers:
        click.echo(f"llc: {f.line()}", err=True)
    for m in out.moves:
        click.echo(f"llc: balance at {m.at_s:.1f} s: {m.line()}"
                   + (f"; {m.lost_s:.1f} s to the next token" if m.lost_s is not None else ""), err=True)
    for r in results:
        r.text = tok.decode(r.tokens, skip_special_tokens=True)
    summary = summarize(results, stage_stats, wall, started, schema.open_build(out.build).plan)
    summary["failovers"] = [asdict(f) for f in failovers]
    summary["moves"] = [asdict(m) for m in out.moves]
    if balancer is not None:  # each stage's pace against the plan, every couple of seconds
        summary["windows"] = balancer.windows
    if timeline_path:
        from llc.runtime.timeline import render_pace, render_timeline

        events = {st.device: [{"rid": e[0], "step": e[1], "start": e[2], "end": e[3], "slot": e[4],
                               "rows": e[5]} for e in st.events if e[2] >= started]  # this run only
                  for st in stage_stats}
        timeline_path.write_text(render_timeline(
            events, [st.device for st in stage_stats], f"{len(results)} request(s), concurrency {concurrency}",
            render_pace(balancer.windows if balancer else [], summary["moves"])))
        click.echo(f"timeline: {timeline_path}", err=True)
    _print_summary(summary)
    if json_path:
        doc = {"params": params.to_dict(), "concurrency": concurrency, "summary": summary,
               "results": [{"prompt": texts[r.index], "prompt_ids": r.prompt, "tokens": r.tokens, "text": r.text,
                            "ttft_ms": r.ttft_ms, "ms_per_token": r.ms_per_token} for r in results]}
        json_path.write_text(json.dumps(doc, indent=2) + "\n")


@dataclass
class Outcome:
    results: list[RequestResult]
    stats: list[StageStats]  # of the devices that finished the run
    wall_s: float
    started: float  # wall clock (time.time) at the start, to pick this run's device events
    build: Path  # the build that finished the run: BUILD, or a re-plan of it (a loss, a move)
    failovers: list[Failover] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)


def generate(build_dir: Path, prompts: list[list[int]], params: SamplingParams, concurrency: int,
             on_token: Callable[[RequestResult, int, bool], None] | None = None, target_name: str | None = None,
             attach: bool = False, timeout: float = 60.0, failover: bool = True,
             balancer: Balancer | None = None) -> Outcome:
    """Every prompt through the build's devices (started here unless attached), surviving lost devices.

    A device lost on the way (llc.runtime.failover) is planned around when this
    run started the devices: a re-plan over the others, started, and every
    unfinished request resumed where it was. Otherwise, or with ``failover``
    off, the loss ends the run with DeviceFailure, as any other device failure does.
    A ``balancer`` (llc.runtime.balance) watches the devices this run started and
    moves layers off one that turns slow, the same way: re-plan, restart, resume.
    """
    results = [RequestResult(i, list(p)) for i, p in enumerate(prompts)]
    failovers: list[Failover] = []
    moves: list[Move] = []
    waiting: list = []  # the failover or move whose first token after the restart is awaited
    since = 0.0

    def tokens(r: RequestResult, token: int, done: bool) -> None:
        if waiting:
            waiting.pop().lost_s = time.monotonic() - since
        if on_token:
            on_token(r, token, done)

    current, t0, started = Path(build_dir), 0.0, 0.0
    tokens_at_loss = -1
    while True:
        owned = False  # until connected: a device that fails to start is not lost, it is broken
        try:
            with devices_running(current, schema.open_build(current), target_name, attach, timeout) as coord:
                owned = coord.owned
                if not t0:  # the run's clock starts when its devices are up, and runs on through restarts
                    t0, started = time.monotonic(), time.time()
                watch = balancer if balancer is not None and owned else None
                if watch is not None:
                    watch.restart(current)
                coord.generate(prompts, params, concurrency, tokens, results, watch=watch)
                wall = time.monotonic() - t0
                if watch is not None:
                    watch.finish()
                stats = coord.stats()
            return Outcome(results, stats, wall, started, current, failovers, moves)
        except Rebalance as e:
            since, current = time.monotonic(), e.build
            moves.append(e.move)
            waiting[:] = [e.move]
            devices = ", ".join(schema.open_build(current).devices)
            click.echo(f"llc: balance: {e.move.line()}; restarting with {devices}", err=True)
        except DeviceFailure as e:
            produced = sum(len(r.tokens) for r in results)
            # devices llc deploy started are not ours to re-plan; and a second loss before any
            # new token is no dropout: the same request kills device after device
            if not failover or not owned or not e.lost or produced == tokens_at_loss:
                raise
            tokens_at_loss = produced
            since = time.monotonic()
            click.echo(f"llc: device {e.device} lost ({e.reason}); re-planning over the others ...", err=True)
            current = without(current, e.device, Path(build_dir), len(failovers) + 1)
            failovers.append(Failover(e.device, e.reason, tuple(schema.open_build(current).devices),
                                      time.monotonic() - since,
                                      sum(r.finished is None and r.submitted > 0 for r in results)))
            waiting[:] = [failovers[-1]]


@contextlib.contextmanager
def devices_running(build_dir: Path, build: schema.Build, target_name: str | None, attach: bool, timeout: float):
    """A coordinator connected to the build's devices: started here (and stopped on the way out,
    whatever happens), or already running (`llc deploy`, --attach). A device's failure carries
    its last log lines."""
    names = sorted({s.target for s in build.plan.stages})
    if target_name is None and len(names) > 1:
        raise LlcError(None, f"the plan mixes targets {names}; pick one with --target")
    # After `llc deploy` the phones already run this build: attach, and watch them for health and logs.
    watcher = None
    if target_name is None and names == ["adb"]:
        from llc.targets.adb import deployed_target

        watcher = deployed_target(build_dir)
        if watcher is not None and not attach:
            click.echo("attaching to the devices `llc deploy` started (they keep running)", err=True)
            attach = True
    target: Target | None = None if attach else make_target(target_name or names[0])
    monitor = target or watcher
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every device.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    coord: Coordinator | None = None
    try:
        if target is not None:
            click.echo(f"starting {len(build.devices)} device(s) with target {target.name} ...", err=True)
            target.start(build_dir, build.devices)
        coord = Coordinator(build_dir, health=monitor.health if monitor else None)
        coord.owned = target is not None
        coord.connect(timeout)
        yield coord
        if target is not None:
            coord.stop_devices()
    except DeviceError as e:
        if monitor is not None:  # the device's last words, under the one-line error
            e.details = [f"{e.device}| {line}" for line in monitor.logs(e.device).splitlines() if line.strip()][-5:]
        raise
    finally:
        if coord is not None:  # a stop was sent only to devices this run started, and they are stopped below
            coord.close(linger_ms=0 if target is not None else 500)
        if target is not None:
            target.stop()
        if watcher is not None:
            watcher.close()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run()
