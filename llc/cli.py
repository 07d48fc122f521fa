"""The `llc` command line.

Every user mistake surfaces as one line ``llc: error: <file>: <problem>`` and
exit code 2; nothing prints a traceback unless LLC_DEBUG=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from llc import __version__
from llc.bundle import schema
from llc.errors import LlcError, one_line_errors

MIB = 1 << 20


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llc")
def main() -> None:
    """Split a decoder LLM across phones: compile, deploy, run."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--max-context", type=click.IntRange(2), default=1024, show_default=True)
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--granularity", type=click.Choice(["layer", "block"]), default="layer", show_default=True)
@one_line_errors
def inspect(model: Path, prompt_tokens: int, max_context: int, no_simplify: bool, granularity: str) -> None:
    """Show the layers of MODEL with parameters and cost per layer."""
    from llc.compiler import analysis_passes, new_state
    from llc.compiler.pipeline import PassManager
    from llc.profile import Workload

    if prompt_tokens >= max_context:
        raise LlcError(None, "--prompt-tokens must be below --max-context")
    wl = Workload(prompt_tokens=prompt_tokens, max_context=max_context)
    state = PassManager(analysis_passes(not no_simplify, granularity)).run(new_state(model, None, wl))
    sig = state.signature
    click.echo(f"{model}: {len(state.model.graph.node)} nodes, {len(sig.kv) // 2} KV layers, "
               f"opset {max((o.version for o in state.model.opset_import if o.domain in ('', 'ai.onnx')), default='?')}")
    click.echo("inputs: " + ", ".join(f"{n} ({r})" for n, r in sig.input_roles.items() if r != "kv")
               + f"; logits: {sig.logits}")
    hdr = f"{'block':<10}{'nodes':>7}{'params M':>10}{'weights MB':>12}{'GFLOP prefill':>15}" \
          f"{'MFLOP/token':>13}{'KV MB @ctx':>12}{'cut B/token':>13}"
    click.echo(hdr)
    for b in state.blocks:
        click.echo(f"{b.label:<10}{len(b.nodes):>7}{b.weight_bytes / 4e6:>10.2f}{b.weight_bytes / MIB:>12.2f}"
                   f"{b.flops_prefill / 1e9:>15.3f}{b.flops_decode / 1e6:>13.2f}{b.kv_bytes / MIB:>12.2f}"
                   f"{b.cut_bytes_decode:>13}")
    tot_w = sum(b.weight_bytes for b in state.blocks)
    click.echo(f"{'total':<10}{len(state.model.graph.node):>7}{tot_w / 4e6:>10.2f}{tot_w / MIB:>12.2f}"
               f"{sum(b.flops_prefill for b in state.blocks) / 1e9:>15.3f}"
               f"{sum(b.flops_decode for b in state.blocks) / 1e6:>13.2f}"
               f"{sum(b.kv_bytes for b in state.blocks) / MIB:>12.2f}")
    for n in state.notes:
        click.echo(f"note: {n}")


@main.command(name="compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--devices", "devices", required=True, type=click.Path(path_type=Path),
              help="Device profile YAML.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=Path("build"), show_default=True)
@click.option("--objective", type=click.Choice(["latency", "throughput"]), default=None,
              help="Override the profile's workload objective.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=None)
@click.option("--max-context", type=click.IntRange(2), default=None)
@click.option("--requests", "requests_in_flight", type=click.IntRange(1), default=None,
              help="Requests in flight (KV cache is reserved for each).")
@click.option("--stages", type=click.IntRange(1), default=None,
              help="Exactly this many stages (default: the solver chooses).")
@click.option("--max-batch", type=click.IntRange(1), default=None,
              help="Decode steps of this many requests run as one batch (default: --requests; 1: off).")
@click.option("--split", "split", default=None, metavar="even|memory|FILE",
              help="A fixed assignment instead of the MIP: the same number of blocks per device, blocks "
                   "in proportion to memory, or a YAML file of {device, blocks: [first, last]} stages.")
@click.option("--weights", type=click.Choice(["fp32", "int8", "int4"]), default="fp32", show_default=True,
              help="Quantize an fp32 model's MatMul weights (onnxruntime MatMulNBits, blocks of 32).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--granularity", type=click.Choice(["layer", "block"]), default="layer", show_default=True,
              help="Cut only between layers, or at every legal cut (half layers).")
@click.option("--dump-after", multiple=True, help="Dump the compile state after this pass (or 'all').")
@click.option("--force", is_flag=True, help="Compile even if OUT is an intact build of the same inputs.")
@click.option("-q", "--quiet", is_flag=True)
@one_line_errors
def compile_cmd(model: Path, devices: Path, out: Path, objective, prompt_tokens, max_context,
                requests_in_flight, stages, max_batch, split, weights: str, no_simplify: bool, granularity: str, dump_after,
                force: bool, quiet: bool) -> None:
    """Split MODEL across the devices in a profile and write per-device bundles to OUT."""
    from llc.compiler import compile_model, with_overrides
    from llc.profile import load_profile

    profile = load_profile(devices)
    wl = with_overrides(profile.workload, objective=objective, prompt_tokens=prompt_tokens,
                        max_context=max_context, requests_in_flight=requests_in_flight,
                        stages=stages, max_batch=max_batch)
    if wl.stages is not None and wl.stages > len(profile.devices):
        raise LlcError(devices, f"--stages {wl.stages} but the profile has {len(profile.devices)} device(s)")
    if wl.prompt_tokens >= wl.max_context:
        raise LlcError(devices, f"prompt tokens ({wl.prompt_tokens}) must be below max context "
                                f"({wl.max_context})")
    state, pm = compile_model(model, profile, out, workload=wl, simplify=not no_simplify,
                              granularity=granularity, dump_after=set(dump_after), quiet=quiet, split=split,
                              force=force, weights=weights)
    if state.up_to_date:
        click.echo(f"build {out} is up to date (build id {schema.read(out, schema.PLAN).build_id}): "
                   f"same model, profile, options and llc version; nothing to do")
        return
    (Path(out) / "timings.json").write_text(json.dumps(
        {"passes": {t.name: round(t.seconds, 4) for t in pm.timings},
         "mip_seconds": round(state.plan.solve_seconds, 4)}, indent=1) + "\n")
    if not quiet:
        print_plan(Path(out))


def print_plan(build: Path) -> None:
    plan = schema.read(build, schema.PLAN)
    p = plan.predicted
    click.echo(f"plan {plan.build_id} ({plan.objective}, {plan.split}): {len(plan.stages)} stage(s), "
               f"decode {p.decode_ms_per_token:.2f} ms/token, prefill {p.prefill_ms:.1f} ms "
               f"({plan.workload.prompt_tokens} tokens), bottleneck {p.bottleneck_ms:.2f} ms")
    if p.tokens_per_s_batched is not None and plan.workload.requests_in_flight > 1:
        click.echo(f"  with {plan.workload.requests_in_flight} requests in flight: {p.tokens_per_s_batched:.1f} "
                   f"tokens/s predicted (decode steps in batches of {p.batch_group})")
    click.echo(f"  {'stage':<6}{'device':<16}{'layers':<22}{'memory MB':>16}{'decode ms':>11}"
               f"{'prefill ms':>12}{'hop ms':>8}")
    for s in plan.stages:
        layers = s.labels[0] if s.labels[0] == s.labels[1] else f"{s.labels[0]} .. {s.labels[1]}"
        mem = f"{s.memory_bytes / MIB:.0f}/{s.memory_limit_bytes / MIB:.0f}"
        click.echo(f"  {s.index:<6}{s.device:<16}{layers:<22}{mem:>16}{s.compute_ms_decode:>11.2f}"
                   f"{s.compute_ms_prefill:>12.1f}{s.hop_ms_decode:>8.2f}")
    for link in plan.links:
        click.echo(f"  link {link.src} -> {link.dst}: {link.bytes_per_token_decode} B/token, "
                   f"{link.bytes_prefill} B prefill")
    for n in plan.notes:
        click.echo(f"  note: {n}")
    click.echo(f"wrote {build}/ (report: {build}/report.html)")


@main.command()
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--tolerance", type=float, default=1e-4, show_default=True)
@click.option("--prompt-len", type=click.IntRange(1), default=7, show_default=True)
@one_line_errors
def verify(build: Path, tolerance: float, prompt_len: int) -> None:
    """Check the split stages against the unsplit model, numerically."""
    from llc.progress import to_stderr
    from llc.runtime.verify import verify_build

    diffs = verify_build(build, prompt_len=prompt_len, say=to_stderr)
    worst = max((d for d in diffs if d.checked), key=lambda d: d.max_abs_diff)
    logits_name = schema.read(build, schema.PLAN).model.logits
    for step in ("prefill", "decode"):
        ds = [d for d in diffs if d.step == step]
        logits = next(d for d in ds if d.output == logits_name)
        others = max((d.max_abs_diff for d in ds if d is not logits), default=0.0)
        click.echo(f"{step:<8} logits max|diff| {logits.max_abs_diff:.3e}   "
                   f"other outputs ({len(ds) - 1}) max|diff| {others:.3e}")
    batched = {d.step: d.max_abs_diff for d in diffs if d.step.startswith("batched")}
    if batched:
        click.echo(f"batched  logits max|diff| {batched['batched decode']:.3e}   (requests of different lengths as one batch; "
                   f"each alone: {batched['batched vs alone']:.3e}, not checked)")
    if worst.max_abs_diff > tolerance:
        raise LlcError(build, f"split differs from unsplit: {worst.output} ({worst.step}) "
                              f"max|diff| {worst.max_abs_diff:.3e} > {tolerance:g}")
    click.echo(f"ok: split == unsplit within {tolerance:g} (worst {worst.max_abs_diff:.3e})")


@main.command(name="eval")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score this text instead of the built-in one.")
@click.option("--fp32", "fp32", type=click.Path(dir_okay=False, path_type=Path),
              help="The fp32 model to compare with, when the build's model came quantized (e.g. from "
                   "onnxruntime-genai's builder); by default the model the build was compiled from.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures here.")
@one_line_errors
def eval_cmd(build: Path, text_file: Path | None, fp32: Path | None, json_path: Path | None) -> None:
    """Quality of the build's weights against the fp32 model: perplexity and top-1 agreement."""
    from llc.runtime.evaluate import TEXT, evaluate

    q = evaluate(build, text_file.read_text() if text_file else TEXT, fp32)
    click.echo(f"{q.weights}: perplexity {q.perplexity:.3f} (fp32 {q.perplexity_fp32:.3f}), top-1 agreement with "
               f"fp32 {q.top1_agreement:.1%} over {q.tokens} tokens, max |logit diff| {q.max_abs_logit_diff:.3g}")
    if json_path:
        json_path.write_text(json.dumps(q.as_dict(), indent=1) + "\n")


def _register_optional() -> None:
    """Commands that live in their own modules."""
    for mod, attr in (("llc.runtime.run", "run"), ("llc.runtime.serve", "serve"), ("llc.lab.phones", "lab"),
                      ("llc.targets.deploy", "commands")):
        try:
            module = __import__(mod, fromlist=[attr])
        except ImportError as e:
            if e.name == mod:  # not written yet
                continue
            raise
        obj = getattr(module, attr, None)
        for cmd in (obj if isinstance(obj, (list, tuple)) else [obj]):
            if cmd is not None:
                main.add_command(cmd)


_register_optional()

if __name__ == "__main__":
    main()
