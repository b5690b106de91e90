"""``pgroups reshard-plan SRC.yaml DST.yaml --world-size N [--model SPEC.yaml] [--rank R] [--json]``: a plan, offline.

SRC and DST are pgroups configs with an optional ``placement:`` section (see
:mod:`pgroups.reshard.layout`). Without ``--model`` the plan is for a Llama-3-8B-shaped model.
Hosts are unknown offline unless given: ``--ranks-per-host K`` (K consecutive ranks per host,
as torchrun places them) or ``--hostfile FILE`` (one host name per rank, in rank order).
``--rank R`` reports only rank R's share (what it sends, receives, copies; fast at any world
size, as each rank computes it at run time). Two hashes are printed: the plan hash (layouts, model,
hosts: what the plan is a function of) and the agreement hash — the plan hash with the options
both ends of a message share (destination dtypes, ``bucket_bytes`` and ``verify``, at the
``Resharder``'s defaults unless ``--bucket-bytes`` / ``--verify`` say otherwise): the number the
ranks of a ``Resharder`` compare before any byte moves, and the one its errors name.
The report lists routed experts (each side's expert mesh, the experts each rank owns), vocabulary
padding, dtypes, bytes per rank against the lower bound, steps, and with hosts known the bytes each
host sends to and receives from other hosts (max/mean over hosts). ``--dst-dtype D`` converts
every floating tensor at the sender (``fp8``: tensors of >= 2 dims, with float32 scales per row;
``fp8-block``: the >= 2-D tensors of the transformer layers, with a float32 scale per 128 x 128
block, as DeepSeek-V3's and Qwen3's FP8 checkpoints store them — embedding and head keep their
dtype; a layout pair whose shards would split a block is refused, exit 2) and adds the bytes on
the wire in the destination dtypes. ``--src-names MAP`` says the source shards
are separate tensors under a name map (``llama`` or a YAML), ``--dst-names MAP`` that the
destination wants them so: the plan is then the sub-block reshard that converts inside the
transfer (:func:`~pgroups.reshard.names.sub_block_model`), and its hash is that plan's.
Exit 0 when every destination rank receives exactly its lower bound, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..cli import EXTENSIONS
from ..errors import ConfigError, allowed
from .layout import load_layout, model_layout
from .names import conversion_report, load_name_map, sub_block_model
from .plan.network import host_bytes, max_over_mean
from .planner import Plan, describe_plan, describe_share, plan_reshard, plan_share
from . import convert
from .wire import DEFAULT_BUCKET_BYTES, Shapes, agreement_digest, first_scale_cut
from .spec import ModelSpec, llama_like, load_model_spec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reshard-plan", help=EXTENSIONS["reshard-plan"][1])
    parser.add_argument("src", help="source layout: a pgroups config, optionally with placement: "
                                    "(with --src/--dst: a config with models:)")
    parser.add_argument("dst", nargs="?", help="destination layout: a pgroups config, optionally with placement:")
    parser.add_argument("--src", dest="src_model", metavar="MODEL", help="plan from this model of the config's models:")
    parser.add_argument("--dst", dest="dst_model", metavar="MODEL", help="plan to this model of the config's models:")
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
    parser.add_argument("--bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES,
                        help=f"the Resharder's bucket_bytes, for the agreement hash (default {DEFAULT_BUCKET_BYTES})")
    parser.add_argument("--verify", action="store_true", help="the Resharder runs with verify=True (agreement hash)")
    parser.set_defaults(func=cmd_reshard_plan)


#: ``--dst-dtype`` values
DST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32, "fp8": torch.float8_e4m3fn,
              "float8_e4m3fn": torch.float8_e4m3fn, "fp8-block": torch.float8_e4m3fn}


def _dst_dtypes(value: Optional[str], model: ModelSpec) -> Optional[Dict[str, torch.dtype]]:
    """``{tensor: dtype}`` for ``--dst-dtype`` (None when not given); ConfigError for a bad name."""
    if value is None:
        return None
    if value not in DST_DTYPES:
        raise ConfigError(f"--dst-dtype {value!r} is not known; allowed: {allowed(DST_DTYPES)}")
    dtype = DST_DTYPES[value]
    if value == "fp8-block":
        return {t.name: dtype for t in model.tensors
                if t.dtype.is_floating_point and len(t.shape) >= 2 and isinstance(t.layer, int)}
    return {t.name: dtype for t in model.tensors
            if t.dtype.is_floating_point and (len(t.shape) >= 2 or not convert.is_scaled(dtype))}


def _conversions(args: argparse.Namespace, model: ModelSpec) -> Tuple[ModelSpec, Dict[str, Dict]]:
    """The model to plan — :func:`sub_block_model` when ``--src-names`` / ``--dst-names`` ask for a
    conversion — and ``{"src" / "dst": conversion_report}``. ConfigError if the two maps split
    different tensors."""
    maps = {side: load_name_map(value) for side, value in (("src", args.src_names), ("dst", args.dst_names))
            if value is not None}
    if not maps:
        return model, {}
    reports = {side: conversion_report(model, names) for side, names in maps.items()}
    split = {side: {t.name for t in model.tensors if not isinstance(names.target(t.name), str)}
             for side, names in maps.items()}
    if len(split) == 2 and split["src"] != split["dst"]:
        raise ConfigError(f"--src-names {args.src_names} and --dst-names {args.dst_names} split different tensors "
                          f"by role ({len(split['src'])} vs {len(split['dst'])}); they must split the same ones")
    return sub_block_model(model, maps.get("src", maps.get("dst"))), reports


def _describe_conversions(conversions: Dict[str, Dict]) -> List[str]:
    lines = []
    for side, what in (("src", "source: separate tensors under name map {map!r}"),
                       ("dst", "destination: separate tensors under name map {map!r}")):
        c = conversions.get(side)
        if c is not None:
            lines.append(what.format(map=c["map"]) + f", converted inside the transfer ({c['fused']} fused tensors "
                         f"planned as {c['sub_blocks']} sub-block tensors, {c['renamed']} renamed; each rank passes "
                         "views of its shards, no copy)")
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


def _layouts(args: argparse.Namespace):
    """(source, destination) layouts: two config files, or two models of one config."""
    if args.src_model is None and args.dst_model is None:
        if args.dst is None:
            raise ConfigError("give a destination layout (SRC.yaml DST.yaml), or two models of one config "
                              "(CONFIG --src MODEL --dst MODEL)")
        return load_layout(args.src, args.world_size), load_layout(args.dst, args.world_size)
    if args.src_model is None or args.dst_model is None or args.dst is not None:
        raise ConfigError("--src MODEL and --dst MODEL go together, with one config (CONFIG --src actor --dst rollout)")
    return (model_layout(args.src, args.world_size, args.src_model),
            model_layout(args.src, args.world_size, args.dst_model))


def cmd_reshard_plan(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be a positive integer, got {args.world_size}")
    if args.bucket_bytes < 1:
        raise ConfigError(f"--bucket-bytes must be a positive integer, got {args.bucket_bytes}")
    src, dst = _layouts(args)
    model = load_model_spec(args.model) if args.model else llama_like(name="llama-3-8b-shapes")
    model, conversions = _conversions(args, model)
    dtypes = convert.resolve_dst_dtypes(model, _dst_dtypes(args.dst_dtype, model))
    scales = "block" if args.dst_dtype == "fp8-block" else "row"
    if args.rank is not None:
        if not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} is outside the job's ranks 0..{args.world_size - 1}")
        share = plan_share(src, dst, model, args.rank, _hosts(args))
        _check_scales(share, share.transfers, dtypes, scales, args.dst_dtype)
        agreement = _agreement(args, share, model, dtypes, scales)
        if args.json:
            print(json.dumps({"world_size": args.world_size, **share.summary(dtypes, scales), **agreement,
                              "names": conversions}))
        else:
            print("\n".join([describe_share(share, dtypes, scales), _describe_agreement(agreement),
                             *_describe_conversions(conversions)]))
        return 0 if share.report is None or share.report.ratio == 1.0 else 1
    hosts = _hosts(args)
    plan = plan_reshard(src, dst, model, hosts)
    _check_scales(plan, plan.transfers, dtypes, scales, args.dst_dtype)
    traffic = _host_traffic(plan, hosts)
    agreement = _agreement(args, plan, model, dtypes, scales)
    if args.json:
        result = {"world_size": args.world_size, **plan.summary(dtypes, scales), **agreement, "names": conversions}
        if traffic is not None:
            result["host_bytes"] = traffic
        if args.transfers:
            result["transfers"] = [
                {"tensor": t.tensor, "src": t.src, "dst": t.dst, "step": t.step, "bytes": t.nbytes,
                 "global": [list(b) for b in t.global_box], "src_local": [list(b) for b in t.src_box],
                 "dst_local": [list(b) for b in t.dst_box]} for t in plan.transfers]
        print(json.dumps(result))
    else:
        lines = [describe_plan(plan, dst_dtypes=dtypes, fp8_scales=scales), _describe_agreement(agreement),
                 *_describe_conversions(conversions)]
        if traffic is not None:
            lines.append(f"bytes between hosts (source dtypes): {len(traffic['hosts'])} hosts; per host out max/mean "
                         f"{traffic['out_max_over_mean']:.2f}, in max/mean {traffic['in_max_over_mean']:.2f} "
                         "(over the hosts that send / receive any)")
        print("\n".join(lines))
    return 0 if plan.max_ratio == 1.0 else 1


def _host_traffic(plan: Plan, hosts: Optional[List[str]]) -> Optional[Dict[str, Any]]:
    """Per host, the network bytes its ranks send to / receive from other hosts, and max/mean of
    each over the hosts with any (None when hosts are unknown)."""
    if hosts is None:
        return None
    per_host = host_bytes(((t.src, t.dst, t.nbytes) for t in plan.transfers if not t.is_local), hosts)
    return {"hosts": {h: list(v) for h, v in sorted(per_host.items())},
            "out_max_over_mean": max_over_mean(v[0] for v in per_host.values()),
            "in_max_over_mean": max_over_mean(v[1] for v in per_host.values())}


def _check_scales(plan: Any, transfers: Any, dtypes: Dict[str, torch.dtype], scales: str, option: str) -> None:
    """ConfigError when an fp8 sender would not hold every value of a scale it computes (a
    transfer splitting a block, or a row-parallel weight's rows from an ISP source)."""
    if any(convert.is_scaled(d) for d in dtypes.values()):
        problem = first_scale_cut(transfers, Shapes(plan, scales), dtypes)
        if problem is not None:
            raise ConfigError(f"--dst-dtype {option}: {problem}")


def _agreement(args: argparse.Namespace, plan: Any, model: ModelSpec, dtypes: Dict[str, torch.dtype],
               scales: str) -> Dict[str, Any]:
    """The hash a Resharder's ranks compare for this plan (``plan`` or a share: one digest) with
    these destination dtypes and fp8 scales, ``--bucket-bytes`` and ``--verify``, and those options."""
    converted = convert.converted_dtypes(model, dtypes)
    digest = agreement_digest(plan, args.bucket_bytes, converted, args.verify, scales)
    return {"agreement_hash": f"{digest & (2 ** 64 - 1):016x}",
            "agreement": {"bucket_bytes": args.bucket_bytes, "verify": args.verify,
                          "converted_tensors": len(converted)}}


def _describe_agreement(agreement: Dict[str, Any]) -> str:
    a = agreement["agreement"]
    return (f"agreement hash {agreement['agreement_hash']} (the plan hash with {a['converted_tensors']} tensors "
            f"converted at the sender, bucket_bytes {a['bucket_bytes']}, verify {'on' if a['verify'] else 'off'}: "
            "what a Resharder's ranks compare before any byte moves)")
