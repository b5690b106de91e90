"""``pgroups reshard-plan SRC.yaml DST.yaml --world-size N [--model SPEC.yaml] [--rank R] [--json]``: a plan, offline.

SRC and DST are pgroups configs with an optional ``placement:`` section (see
:mod:`pgroups.reshard.layout`). Without ``--model`` the plan is for a Llama-3-8B-shaped model.
Hosts are unknown offline unless given: ``--ranks-per-host K`` (K consecutive ranks per host,
as torchrun places them) or ``--hostfile FILE`` (one host name per rank, in rank order).
``--rank R`` reports only rank R's share (what it sends, receives, copies; fast at any world
size, as each rank computes it at run time). The plan hash is the one every rank agrees on.
The report lists routed experts (each side's expert mesh, the experts each rank owns), vocabulary
padding, dtypes, bytes per rank against the lower bound, and steps. ``--dst-dtype D`` converts
every floating tensor at the sender (``fp8``: tensors of >= 2 dims, with float32 scales) and
adds the bytes on the wire in the destination dtypes. ``--src-names MAP`` says the source shards
are separate tensors under a name map (``llama`` or a YAML), fused locally on each source rank
before the transfer; ``--dst-names MAP`` that the destination splits / renames after it.
Exit 0 when every destination rank receives exactly its lower bound, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError, allowed
from .layout import ParallelLayout, load_layout
from .names import conversion_report, load_name_map, separate_model
from .planner import _fmt_bytes, describe_plan, describe_share, plan_reshard, plan_share
from . import convert
from .spec import ModelSpec, llama_like, load_model_spec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reshard-plan", help="plan moving a model between two layouts, offline")
    parser.add_argument("src", help="source layout: a pgroups config, optionally with placement:")
    parser.add_argument("dst", help="destination layout: a pgroups config, optionally with placement:")
    parser.add_argument("--world-size", "-n", type=int, required=True, help="ranks in the whole job")
    parser.add_argument("--model", help="model spec YAML (default: Llama-3-8B shapes, bf16)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("--ranks-per-host", type=int, help="assume K consecutive ranks per host")
    hosts.add_argument("--hostfile", help="file with one host name per rank, in rank order")
    parser.add_argument("--rank", type=int, help="report only this rank's share of the plan")
    parser.add_argument("--json", action="store_true", help="machine-readable summary")
    parser.add_argument("--transfers", action="store_true", help="with --json: list every transfer too")
    parser.add_argument("--dst-dtype", help="destination dtype of floating tensors, converted at the sender: "
                                            f"{', '.join(DST_DTYPES)} (fp8: tensors of >= 2 dims)")
    parser.add_argument("--src-names", help="the source holds separate tensors under this name map (llama or a "
                                            "YAML): fused locally before the transfer")
    parser.add_argument("--dst-names", help="the destination splits / renames under this name map after the "
                                            "transfer")
    parser.set_defaults(func=cmd_reshard_plan)


#: ``--dst-dtype`` values
DST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32, "fp8": torch.float8_e4m3fn,
              "float8_e4m3fn": torch.float8_e4m3fn}


def _dst_dtypes(value: Optional[str], model: ModelSpec) -> Optional[Dict[str, torch.dtype]]:
    """``{tensor: dtype}`` for ``--dst-dtype`` (None when not given); ConfigError for a bad name."""
    if value is None:
        return None
    if value not in DST_DTYPES:
        raise ConfigError(f"--dst-dtype {value!r} is not known; allowed: {allowed(DST_DTYPES)}")
    dtype = DST_DTYPES[value]
    return {t.name: dtype for t in model.tensors
            if t.dtype.is_floating_point and (len(t.shape) >= 2 or not convert.is_scaled(dtype))}


def _conversions(args: argparse.Namespace, model: ModelSpec, src: ParallelLayout,
                 dst: ParallelLayout) -> Dict[str, Dict]:
    """``{"src" / "dst": conversion_report}`` for ``--src-names`` / ``--dst-names``."""
    result = {}
    for side, value, layout in (("src", args.src_names, src), ("dst", args.dst_names, dst)):
        if value is not None:
            names = load_name_map(value)
            separate_model(model, names)   # every fused tensor's roles named (ConfigError otherwise)
            result[side] = conversion_report(model, layout, names)
    return result


def _describe_conversions(conversions: Dict[str, Dict]) -> List[str]:
    lines = []
    for side, what in (("src", "source: separate tensors under name map {map!r} fused locally on each source "
                               "rank before the transfer"),
                       ("dst", "destination: shards split / renamed under name map {map!r} locally after the "
                               "transfer")):
        c = conversions.get(side)
        if c is not None:
            lines.append(what.format(map=c["map"]) + f" ({c['fused']} fused tensors, {c['renamed']} renamed; at most "
                         f"{_fmt_bytes(c['max_rank_bytes'])} of fused rows per rank; no network bytes)")
    return lines


def _hosts(args: argparse.Namespace) -> Optional[List[str]]:
    if args.ranks_per_host is not None:
        if args.ranks_per_host < 1:
            raise ConfigError(f"--ranks-per-host must be a positive integer, got {args.ranks_per_host}")
        return [f"host{r // args.ranks_per_host}" for r in range(args.world_size)]
    if args.hostfile is not None:
        try:
            names = [line.strip() for line in Path(args.hostfile).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"--hostfile {args.hostfile}: cannot read: {exc.strerror or exc}") from None
        if len(names) < args.world_size:
            raise ConfigError(f"--hostfile {args.hostfile} names {len(names)} ranks; the world has {args.world_size}")
        return names[:args.world_size]
    return None


def cmd_reshard_plan(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be a positive integer, got {args.world_size}")
    src = load_layout(args.src, args.world_size)
    dst = load_layout(args.dst, args.world_size)
    model = load_model_spec(args.model) if args.model else llama_like(name="llama-3-8b-shapes")
    dtypes = convert.resolve_dst_dtypes(model, _dst_dtypes(args.dst_dtype, model))
    conversions = _conversions(args, model, src, dst)
    if args.rank is not None:
        if not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} is outside the job's ranks 0..{args.world_size - 1}")
        share = plan_share(src, dst, model, args.rank, _hosts(args))
        if args.json:
            print(json.dumps({"world_size": args.world_size, **share.summary(dtypes), "names": conversions}))
        else:
            print("\n".join([describe_share(share, dtypes), *_describe_conversions(conversions)]))
        return 0 if share.report is None or share.report.ratio == 1.0 else 1
    plan = plan_reshard(src, dst, model, _hosts(args))
    if args.json:
        result = {"world_size": args.world_size, **plan.summary(dtypes), "names": conversions}
        if args.transfers:
            result["transfers"] = [
                {"tensor": t.tensor, "src": t.src, "dst": t.dst, "step": t.step, "bytes": t.nbytes,
                 "global": [list(b) for b in t.global_box], "src_local": [list(b) for b in t.src_box],
                 "dst_local": [list(b) for b in t.dst_box]} for t in plan.transfers]
        print(json.dumps(result))
    else:
        print("\n".join([describe_plan(plan, dst_dtypes=dtypes), *_describe_conversions(conversions)]))
    return 0 if plan.max_ratio == 1.0 else 1
