"""``pgroups reshard-plan SRC.yaml DST.yaml --world-size N [--model SPEC.yaml] [--rank R] [--json]``: a plan, offline.

SRC and DST are pgroups configs with an optional ``placement:`` section (see
:mod:`pgroups.reshard.layout`). Without ``--model`` the plan is for a Llama-3-8B-shaped model.
Hosts are unknown offline unless given: ``--ranks-per-host K`` (K consecutive ranks per host,
as torchrun places them) or ``--hostfile FILE`` (one host name per rank, in rank order).
``--rank R`` reports only rank R's share (what it sends, receives, copies; fast at any world
size, as each rank computes it at run time). The plan hash is the one every rank agrees on.
Exit 0 when every destination rank receives exactly its lower bound, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError
from .layout import load_layout
from .planner import describe_plan, describe_share, plan_reshard, plan_share
from .spec import llama_like, load_model_spec


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
    parser.set_defaults(func=cmd_reshard_plan)


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
    if args.rank is not None:
        if not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} is outside the job's ranks 0..{args.world_size - 1}")
        share = plan_share(src, dst, model, args.rank, _hosts(args))
        if args.json:
            print(json.dumps({"world_size": args.world_size, **share.summary()}))
        else:
            print(describe_share(share))
        return 0 if share.report is None or share.report.ratio == 1.0 else 1
    plan = plan_reshard(src, dst, model, _hosts(args))
    if args.json:
        result = {"world_size": args.world_size, **plan.summary()}
        if args.transfers:
            result["transfers"] = [
                {"tensor": t.tensor, "src": t.src, "dst": t.dst, "step": t.step, "bytes": t.nbytes,
                 "global": [list(b) for b in t.global_box], "src_local": [list(b) for b in t.src_box],
                 "dst_local": [list(b) for b in t.dst_box]} for t in plan.transfers]
        print(json.dumps(result))
    else:
        print(describe_plan(plan))
    return 0 if plan.max_ratio == 1.0 else 1
