"""What a plan reports besides its bytes: the routed experts each side places, vocabulary padding,
dtypes and bytes on the wire, and the readable text of ``pgroups reshard-plan``. Pure."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...ranks import format_rank_spec
from ...units import format_bytes
from ..layout import ParallelLayout
from ..spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    from .types import Plan, PlanShare, Transfer


def owned_experts(layout: ParallelLayout, model: ModelSpec, rank: int) -> Optional[Tuple[int, int]]:
    """Experts ``[first, stop)`` (of every MoE layer) ``rank`` owns in ``layout``; None when the
    model has no routed experts or the rank is not placed there."""
    spec = next((t for t in model.tensors if t.experts is not None), None)
    coords = layout.mesh_coordinates(rank, True) if spec is not None else None
    if coords is None:
        return None
    return spec.experts.owned(layout.mesh_sizes(True)[1], coords[1])


def expert_report(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Optional[Dict[str, Any]]:
    """The routed experts and each side's expert mesh (None without routed experts)."""
    specs = [t for t in model.tensors if t.experts is not None]
    if not specs:
        return None

    def side(layout: ParallelLayout) -> Dict[str, Any]:
        etp, ep, edp = layout.mesh_sizes(True)
        t = layout.topology
        return {"expert_tensor": etp, "expert": ep, "expert_data": edp,
                "layout": t.expert_layout if t.expert_enabled else "dense (no expert parallelism)",
                "experts_per_rank": [b - a for a, b in (specs[0].experts.owned(ep, e) for e in range(ep))]}

    return {"experts": specs[0].experts.num_experts, "tensors": len(specs),
            "grouped": sum(1 for t in specs if t.experts.dim is not None), "src": side(src), "dst": side(dst)}


def vocab_report(src: ParallelLayout, dst: ParallelLayout, model: ModelSpec) -> Optional[Dict[str, Any]]:
    """Vocabulary rows, and each side's padded rows (Megatron's multiple of ``vocab_multiple`` x TP;
    None when no tensor is a vocabulary)."""
    spec = next((t for t in model.tensors if t.vocab), None)
    if spec is None:
        return None

    def side(layout: ParallelLayout) -> Dict[str, Any]:
        tp = layout.mesh_sizes(False)[0]
        per = spec.padded_rows(tp, layout.vocab_multiple)
        rows = spec.axis_len if per is None else per * tp
        return {"multiple": layout.vocab_multiple, "rows": rows, "padding_rows": rows - spec.axis_len}

    return {"rows": spec.axis_len, "tensors": sum(1 for t in model.tensors if t.vocab),
            "src": side(src), "dst": side(dst)}


def dtype_counts(tensors: Sequence[TensorSpec], dtypes: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
    """``{dtype name: tensors}`` of the tensors (in ``dtypes`` where it names them)."""
    counts: Dict[str, int] = {}
    for t in tensors:
        name = str((dtypes or {}).get(t.name, t.dtype)).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def wire_bytes(model: ModelSpec, transfers: Sequence[Transfer], dst_dtypes: Optional[Mapping[str, Any]],
               fp8_scales: str = "row") -> Dict[int, int]:
    """``{receiver: bytes on the wire}`` with each tensor converted to ``dst_dtypes`` at the sender
    (fp8: the values, then float32 scales in format ``fp8_scales``; see :mod:`.convert`)."""
    from .. import convert   # the executor's own accounting of converted bytes

    out: Dict[int, int] = {}
    for t in transfers:
        dtype = (dst_dtypes or {}).get(t.tensor)
        if dtype is None or dtype == model[t.tensor].dtype:
            nbytes = t.nbytes
        else:
            shape = [b - a for a, b in t.src_box] or [1]
            nbytes = convert.wire_layout(shape, dtype, convert.scale_dims(model[t.tensor], fp8_scales))[1]
        out[t.dst] = out.get(t.dst, 0) + nbytes
    return out


def _describe_context(s: Dict[str, Any], dtypes: Dict[str, int]) -> List[str]:
    """Report lines on experts, vocabulary padding and dtypes (shared by the plan and a share)."""
    lines = []
    experts = s.get("experts_report")
    if experts:
        sides = []
        for name in ("src", "dst"):
            e = experts[name]
            per = sorted(set(e["experts_per_rank"]))
            sides.append(f"{name} etp {e['expert_tensor']} x ep {e['expert']} x edp {e['expert_data']} "
                         f"({e['layout']}; experts per EP rank: {'/'.join(map(str, per))})")
        lines.append(f"routed experts: {experts['experts']} per MoE layer in {experts['tensors']} tensors "
                     f"({experts['grouped']} grouped [E, ...]); {'; '.join(sides)}; each destination rank "
                     "receives only its own experts")
    vocab = s.get("vocab_padding")
    if vocab:
        sides = [f"{name} {v['rows']} rows" + (f" (padded to a multiple of {v['multiple']} x TP: {v['padding_rows']} "
                                               "padding rows)" if v["multiple"] else " (unpadded)")
                 for name, v in (("src", vocab["src"]), ("dst", vocab["dst"]))]
        lines.append(f"vocabulary: {vocab['rows']} rows in {vocab['tensors']} tensors; {'; '.join(sides)}; "
                     "padding rows are never sent, destination padding is zero-filled")
    model_dtypes = ", ".join(f"{n} x{c}" for n, c in dtypes.items())
    dst_dtypes = ", ".join(f"{n} x{c}" for n, c in s["dst_dtypes"].items())
    blocks = " per 128 x 128 block" if s.get("fp8_scales") == "block" else " per row"
    fp8 = f"; fp8 with float32 scales{blocks}" if "float8" in dst_dtypes else ""
    lines.append(f"dtypes: source {model_dtypes}; destination {dst_dtypes}"
                 + ("" if model_dtypes == dst_dtypes else f" (converted at the sender{fp8})"))
    return lines


def describe_plan(plan: Plan, rank_limit: int = 16, dst_dtypes: Optional[Mapping[str, Any]] = None,
                  fp8_scales: str = "row") -> str:
    """A readable report: summary lines, then one line per destination rank (first ``rank_limit``);
    ``dst_dtypes``, ``fp8_scales`` as in :meth:`Plan.summary`."""
    s = plan.summary(dst_dtypes, fp8_scales)
    load = s["sender_load"]
    experts = s["model"]["expert_tensors"]
    lines = [
        f"model {plan.model.name}: {len(plan.model.tensors)} tensors"
        f"{f' ({experts} routed-expert)' if experts else ''}, {format_bytes(plan.model.nbytes)}",
        f"src: {plan.src.describe()}",
        f"dst: {plan.dst.describe()}",
        f"plan hash {s['plan_hash']}",
        *_describe_context({**s, "experts_report": s["experts"]}, s["model"]["dtypes"]),
        f"received {format_bytes(plan.received_bytes)} over the network; lower bound "
        f"{format_bytes(plan.lower_bound_bytes)}; ratio {plan.ratio:.3f} (worst rank {plan.max_ratio:.3f}); "
        f"local copies {format_bytes(s['local_copy_bytes'])}; vocabulary padding zero-filled on the destination "
        f"{format_bytes(s['zero_filled_bytes'])} (never sent)",
        f"steps {plan.max_rank_steps} (most any rank takes part in), sender/receiver pairs {plan.pair_count}, "
        f"sender load max "
        f"{format_bytes(load['max'])} / mean {format_bytes(int(load['mean']))} = {load['max_over_mean']:.2f}",
        f"naive baselines, bytes received per rank: broadcast-all {format_bytes(plan.model.nbytes)}, "
        f"all-gather {format_bytes(plan.model.nbytes)}",
    ]
    converted = s["wire_received_bytes"] != s["received_bytes"]
    if converted:
        lines.append(f"on the wire in the destination dtypes: {format_bytes(s['wire_received_bytes'])} received "
                     f"(source dtypes: {format_bytes(s['received_bytes'])})")
    experts = s["experts"] is not None
    lines.append(f"{'rank':>6} {'needs':>10} {'holds':>10} {'receives':>10} {'bound':>10} {'ratio':>6}"
                 + (f" {'wire':>10}" if converted else "") + (f" {'experts':>8}" if experts else "") + "  senders")
    for r, row in zip(plan.receivers[:rank_limit], s["receivers"]):
        lines.append(f"{r.rank:>6} {format_bytes(r.needed_bytes):>10} {format_bytes(r.held_bytes):>10} "
                     f"{format_bytes(r.received_bytes):>10} {format_bytes(r.lower_bound_bytes):>10} "
                     f"{r.ratio:>6.3f}" + (f" {format_bytes(row['wire_received']):>10}" if converted else "")
                     + (f" {_range(row['experts']):>8}" if experts else "")
                     + f"  {format_rank_spec(r.senders) or '-'}")
    if len(plan.receivers) > rank_limit:
        lines.append(f"   … {len(plan.receivers) - rank_limit} more destination ranks (--json lists all)")
    return "\n".join(lines)


def describe_share(share: PlanShare, dst_dtypes: Optional[Mapping[str, Any]] = None, fp8_scales: str = "row") -> str:
    """A readable report of one rank's share (``dst_dtypes``, ``fp8_scales`` as in :meth:`Plan.summary`)."""
    s = share.summary(dst_dtypes, fp8_scales)
    mine = s["experts"]
    owns = ([f"routed experts: this rank owns {_range(mine['src']) or 'none'} in the source, "
             f"{_range(mine['dst']) or 'none'} in the destination (of every MoE layer)"]
            if mine["src"] or mine["dst"] else [])
    wire = ([f"on the wire in the destination dtypes: receives {format_bytes(s['wire_received_bytes'])}, sends "
             f"{format_bytes(s['wire_sent_bytes'])}"] if s["wire_received_bytes"] != s["received_bytes"]
            or s["wire_sent_bytes"] != s["sent_bytes"] else [])
    return "\n".join([
        f"rank {share.rank}'s share of the plan moving model {share.model.name} ({len(share.model.tensors)} tensors)",
        f"src: {s['src']}",
        f"dst: {s['dst']}",
        f"plan hash {s['plan_hash']}",
        *owns,
        *_describe_context({**s, "experts_report": expert_report(share.src, share.dst, share.model)},
                           dtype_counts(share.model.tensors)),
        *wire,
        f"receives {format_bytes(s['received_bytes'])} in {s['receives']} transfers from "
        f"{_peers(s['receive_peers'])}; lower bound {format_bytes(s['lower_bound_bytes'])}, ratio {s['ratio']:.3f}",
        f"sends {format_bytes(s['sent_bytes'])} in {s['sends']} transfers to {_peers(s['send_peers'])}",
        f"local copies {format_bytes(s['local_copy_bytes'])} ({s['local_copies']}); zero-filled padding "
        f"{format_bytes(s['zero_filled_bytes'])}",
        f"steps {len(s['steps'])}: {', '.join(map(str, s['steps'][:16]))}{' …' if len(s['steps']) > 16 else ''}",
    ])


def _range(bounds: Sequence[int]) -> str:
    """``[2, 4]`` → ``"2-3"``, ``[2, 3]`` → ``"2"``, ``[]`` → ``""``."""
    if not bounds:
        return ""
    first, stop = bounds
    return str(first) if stop - first == 1 else f"{first}-{stop - 1}"


def _peers(ranks: Sequence[int], limit: int = 16) -> str:
    if not ranks:
        return "no rank"
    more = f" … ({len(ranks)} ranks)" if len(ranks) > limit else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {format_rank_spec(ranks[:limit])}{more}"
