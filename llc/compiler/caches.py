"""How a build's KV caches behave on the devices: batched decode and caches written in place.

Both are read off the graph (which op writes each present) and decide what the
manifests say (``max_batch``, ``batch_padding``, ``kv_in_place``); the
partitioner needs the batch size too, to predict a plan's tokens/s as the
devices will run it.
"""

from __future__ import annotations

from llc.compiler.state import CompileState


def batching(state: CompileState) -> tuple[int, str | None]:
    """How many decode steps a stage may batch, and where shorter caches are padded.

    Padding only works if nothing reads a row's length from where its tokens
    sit: positions must be an input (each row gets its own), and the batch
    axis must be free. GroupQueryAttention writes a row's new token after its
    own ``seqlens_k``, so its caches are padded on the right; a Concat-grown
    cache on the left, where the attention mask hides the padding.
    """
    wl, sig = state.workload, state.signature
    want = min(wl.max_batch or wl.requests_in_flight, wl.requests_in_flight)
    if want <= 1:
        return 1, None
    presents = {b.present for b in sig.kv}
    ops = {node.op_type for node in state.model.graph.node if presents.intersection(node.output)}
    batch_free = all(isinstance((state.tensors[b.past].shape or (1,))[0], str) for b in sig.kv)
    if ops == {"GroupQueryAttention"} and batch_free:
        return want, "right"
    if "GroupQueryAttention" not in ops and "position_ids" in sig.input_roles.values() and batch_free:
        return want, "left"
    return 1, None


def kv_in_place(state: CompileState) -> bool:
    """Whether every cache is a GroupQueryAttention's own past and present.

    Then a device binds one buffer of max_context tokens as both, and the op
    writes each step's keys and values into it (onnxruntime's
    past_present_share_buffer, what onnxruntime-genai does): no step copies the
    cache, which a Concat-grown cache costs twice per step (into the present,
    then out to numpy).
    """
    pairs = {(b.past, b.present) for b in state.signature.kv}
    fused = {(node.input[3 + k], node.output[1 + k]) for node in state.model.graph.node
             if node.op_type == "GroupQueryAttention" and len(node.input) > 4 and len(node.output) > 2
             for k in (0, 1)}
    return bool(pairs) and pairs <= fused
