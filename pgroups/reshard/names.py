"""After a reshard, each rank's shards under other names and fused layouts: fused QKV (Megatron's
interleaved, or ``[Q;K;V]``) → separate q / k / v, fused gate/up → gate and up, and tensor names
→ the names an inference engine loads (Hugging Face's, for the shipped ``llama`` map).

Why it is local: every QKV layout hands out heads by one rule (:func:`.spec.attention_heads`) and
every fused part is split like the separate tensor it stands for, so a rank's shard of a fused
tensor already holds exactly the rows of its shards of the separate tensors. Converting is a
reorder of rows the rank has (views where the rows are contiguous): no communication, no bytes
beyond the reshard's lower bound.

A :class:`NameMap` gives, for a source tensor name (``{layer}`` stands for a layer index), either
its new name or ``{sub-block role: new name}``; a role is a sub-block's name without its group
number for attention heads (Megatron's ``q0, k0, v0, q1, …`` are roles ``q``, ``k``, ``v``). Tensors the map does not
name keep their names. From YAML::

    name: llama
    tensors:
      embed.weight: model.embed_tokens.weight
      "layers.{layer}.attn.qkv.weight":
        {q: "model.layers.{layer}.self_attn.q_proj.weight", k: ..., v: ...}

The reverse — separate → fused, e.g. loading a Hugging Face checkpoint (or a vLLM-style layout
with separate q / k / v and gate / up) into Megatron's fused layouts — is local too, on the
*source* side, before the reshard: :func:`fuse_shards` builds each source rank's fused shards
(interleaved per query group, ``[Q;K;V]``, fused gate/up: whatever ``model`` says) from the
separate ones it holds, one copy of its own rows, and the reshard then moves fused shards between
the two layouts at the lower bound. :func:`separate_model` is the separate-named model (its
shapes and splits) the source shards must follow. The conversion is not planned inside the
transfer: it costs each source rank one local copy of its fused tensors' rows.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Tuple, Union

import attrs
import torch

from ..config import read_yaml
from ..errors import ConfigError
from .layout import ParallelLayout, held_tensors
from .spec import LAYER_PLACEHOLDER, Block, ModelSpec, TensorSpec

Target = Union[str, Mapping[str, str]]


@attrs.frozen
class NameMap:
    """Source tensor name patterns → new name or ``{role: new name}``; see the module docstring."""

    rules: Tuple[Tuple[str, Target], ...]
    name: str = "names"
    _compiled: Tuple[Tuple[re.Pattern, Target], ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        compiled = []
        for pattern, target in self.rules:
            regex = re.escape(pattern).replace(re.escape(LAYER_PLACEHOLDER), r"(?P<layer>\d+)")
            compiled.append((re.compile(f"^{regex}$"), target))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def target(self, tensor: str) -> Target:
        """The new name (or ``{role: new name}``) of source tensor ``tensor``; itself if unmapped."""
        for regex, target in self._compiled:
            match = regex.match(tensor)
            if match is not None:
                layer = match.groupdict().get("layer", "")
                if isinstance(target, str):
                    return target.replace(LAYER_PLACEHOLDER, layer)
                return {role: name.replace(LAYER_PLACEHOLDER, layer) for role, name in target.items()}
        return tensor


#: our ``llama_like`` names → Hugging Face Llama's
LLAMA = NameMap((
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{layer}.input_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    ("layers.{layer}.attn.qkv.weight", {"q": "model.layers.{layer}.self_attn.q_proj.weight",
                                        "k": "model.layers.{layer}.self_attn.k_proj.weight",
                                        "v": "model.layers.{layer}.self_attn.v_proj.weight"}),
    ("layers.{layer}.attn.o.weight", "model.layers.{layer}.self_attn.o_proj.weight"),
    ("layers.{layer}.post_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
    ("layers.{layer}.mlp.gate_up.weight", {"gate": "model.layers.{layer}.mlp.gate_proj.weight",
                                           "up": "model.layers.{layer}.mlp.up_proj.weight"}),
    ("layers.{layer}.mlp.down.weight", "model.layers.{layer}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
), "llama")

#: name maps shipped with pgroups, by name
NAME_MAPS: Mapping[str, NameMap] = {"llama": LLAMA}


def load_name_map(obj: Union[str, "os.PathLike[str]", Mapping[str, Any]]) -> NameMap:
    """A shipped map by name (``"llama"``), or one from a YAML path / string / mapping with
    ``tensors: {source pattern: new name or {role: new name}}``. Raises ConfigError."""
    if isinstance(obj, str) and obj in NAME_MAPS:
        return NAME_MAPS[obj]
    if isinstance(obj, Mapping):
        data, source = obj, "<name map>"
    else:
        data, source = read_yaml(obj, "name map")
    tensors = data.get("tensors") if isinstance(data, Mapping) else None
    if not isinstance(tensors, Mapping) or not tensors:
        raise ConfigError(f"{source}: a name map needs 'tensors:', a mapping of source tensor names to new names "
                          f"or to {{role: new name}}; shipped maps: {', '.join(NAME_MAPS)}")
    rules = []
    for pattern, target in tensors.items():
        ok = isinstance(target, str) or (isinstance(target, Mapping) and target and all(
            isinstance(k, str) and isinstance(v, str) for k, v in target.items()))
        if not isinstance(pattern, str) or not ok:
            raise ConfigError(f"{source}: tensors.{pattern}: expected a new name or {{role: new name}}, got {target!r}")
        rules.append((pattern, target if isinstance(target, str) else dict(target)))
    return NameMap(tuple(rules), str(data.get("name", "names")))


def block_role(block: Block) -> str:
    """A sub-block's role: its name, without the group number for attention heads (``q3`` → ``q``)."""
    return block.name.rstrip("0123456789") if block.heads is not None else block.name


def split_roles(spec: TensorSpec, shard: torch.Tensor, tp_size: int, tp: int) -> Dict[str, torch.Tensor]:
    """``{role: rows of shard}`` for a fused tensor's local shard: each role's sub-block shares
    in block order (a view when they are one contiguous run)."""
    pieces: Dict[str, List[Tuple[int, int]]] = {}
    local = 0
    for block in spec.blocks:
        start, stop = block.share(tp_size, tp)
        if stop > start:
            runs = pieces.setdefault(block_role(block), [])
            if runs and runs[-1][1] == local:
                runs[-1] = (runs[-1][0], local + stop - start)
            else:
                runs.append((local, local + stop - start))
            local += stop - start
    axis = spec.tp_dim
    result = {}
    for role, runs in pieces.items():
        parts = [shard.narrow(axis, a, b - a) for a, b in runs]
        result[role] = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
    return result


def convert_shards(shards: Mapping[str, torch.Tensor], model: ModelSpec, layout: ParallelLayout, rank: int,
                   names: NameMap) -> Dict[str, torch.Tensor]:
    """``rank``'s shards (in ``model``'s names and fused layouts, on ``layout``) under the names of
    ``names``, fused tensors split by role. Raises ConfigError naming a tensor whose map asks for a
    role it has no sub-block of."""
    result: Dict[str, torch.Tensor] = {}
    for spec, tp, tp_size, _, _ in held_tensors(layout, model, rank):
        target = names.target(spec.name)
        if isinstance(target, str):
            result[target] = shards[spec.name]
            continue
        roles = split_roles(spec, shards[spec.name], tp_size, tp)
        known = {block_role(b) for b in spec.blocks}
        for role, name in target.items():
            if role not in known:
                raise ConfigError(f"name map {names.name!r}: tensor {spec.name!r} has no sub-block role {role!r}; "
                                  f"its roles: {', '.join(sorted(known))}")
            result[name] = roles.get(role, shards[spec.name].narrow(spec.tp_dim, 0, 0))
    return result


def _roles(spec: TensorSpec, target: Mapping[str, str], names: NameMap) -> Dict[str, List[Block]]:
    """``{role: its sub-blocks in block order}`` of a fused tensor, checked against ``target``."""
    roles: Dict[str, List[Block]] = {}
    for block in spec.blocks:
        roles.setdefault(block_role(block), []).append(block)
    if set(target) != set(roles):
        raise ConfigError(f"name map {names.name!r}: tensor {spec.name!r} has sub-block roles "
                          f"{', '.join(sorted(roles))} but the map names {', '.join(sorted(target))}; "
                          "to fuse, name every role")
    return roles


def separate_model(model: ModelSpec, names: NameMap) -> ModelSpec:
    """The model under ``names``, fused tensors split by role: one tensor per role, its rows the
    role's sub-blocks in block order (separate q / k / v in head order, gate and up), split over
    TP by the same rule — so a rank's separate shards hold exactly the rows of its fused shard.
    This is the layout a Hugging Face checkpoint (TP 1) or a vLLM-style separate layout has.
    Raises ConfigError if a map names only some roles of a fused tensor."""
    specs: List[TensorSpec] = []
    for spec in model.tensors:
        target = names.target(spec.name)
        if isinstance(target, str):
            specs.append(attrs.evolve(spec, name=target))
            continue
        for role, blocks in _roles(spec, target, names).items():
            shape = list(spec.shape)
            shape[spec.tp_dim] = sum(b.size for b in blocks)
            specs.append(TensorSpec.create(target[role], shape, spec.dtype, spec.tp_dim, spec.layer, blocks,
                                           experts=spec.experts))
    return ModelSpec.create(specs, model.num_layers, f"{model.name} ({names.name} names)")


def fuse_shards(shards: Mapping[str, torch.Tensor], model: ModelSpec, layout: ParallelLayout, rank: int,
                names: NameMap) -> Dict[str, torch.Tensor]:
    """``rank``'s shards of ``model`` (names and fused layouts) on ``layout``, built from its
    shards of the separate model (:func:`separate_model`: the names of ``names``): each fused
    shard is its roles' rows in sub-block order (a new tensor); other tensors are passed through
    renamed. The inverse of :func:`convert_shards`.

    Raises ConfigError naming the tensor when a separate shard is missing, or does not have the
    rows this rank's fused shard takes from it (a shard of another layout or TP rank)."""
    result: Dict[str, torch.Tensor] = {}

    def get(name: str, fused: str) -> torch.Tensor:
        if name not in shards:
            raise ConfigError(f"rank {rank}: tensor {name!r} (part of {fused!r} under name map {names.name!r}) "
                              "is not among the shards given")
        return shards[name]

    for spec, tp, tp_size, ep, ep_size in held_tensors(layout, model, rank):
        target = names.target(spec.name)
        if isinstance(target, str):
            result[spec.name] = get(target, spec.name)
            continue
        _roles(spec, target, names)
        axis, used, parts = spec.tp_dim, {role: 0 for role in target}, []
        for block in spec.blocks:
            start, stop = block.share(tp_size, tp)
            if stop > start:
                role = block_role(block)
                source = get(target[role], spec.name)
                if used[role] + stop - start > source.shape[axis]:
                    used[role] += stop - start
                    break
                parts.append(source.narrow(axis, used[role], stop - start))
                used[role] += stop - start
        for role, rows in used.items():
            have = get(target[role], spec.name).shape[axis]
            if rows != have:
                raise ConfigError(f"rank {rank}: tensor {target[role]!r} has {have} rows on dim {axis}, but its "
                                  f"part of {spec.name!r} on this rank (TP rank {tp} of {tp_size}) has {rows}; "
                                  "give this rank's shard of the separate model (see separate_model)")
        if parts:
            result[spec.name] = torch.cat(parts, axis)
        else:
            shape = list(spec.local_shape(tp_size, tp, ep_size, ep))
            result[spec.name] = get(next(iter(target.values())), spec.name).new_empty(shape)
    return result


def conversion_report(model: ModelSpec, layout: ParallelLayout, names: NameMap) -> Dict[str, Any]:
    """What converting ``layout``'s shards under ``names`` costs, locally: ``{"map", "renamed",
    "fused", "max_rank_bytes"}`` — tensors renamed, fused tensors (split or fused by role), and the
    most bytes of fused tensors one rank holds (what :func:`fuse_shards` copies; what
    :func:`convert_shards` reorders, as views where the rows are contiguous)."""
    fused = {spec.name for spec in model.tensors if not isinstance(names.target(spec.name), str)}
    renamed = sum(1 for spec in model.tensors if names.target(spec.name) != spec.name)
    per_shard: Dict[Tuple, int] = {}
    most = 0
    for rank in layout.ranks:
        key = (layout.mesh_coordinates(rank, False)[::3], layout.mesh_coordinates(rank, True)[:2])
        if key not in per_shard:
            per_shard[key] = sum(math.prod(spec.local_shape(tp_size, tp, ep_size, ep)) * spec.itemsize
                                 for spec, tp, tp_size, ep, ep_size in held_tensors(layout, model, rank)
                                 if spec.name in fused)
        most = max(most, per_shard[key])
    return {"map": names.name, "renamed": renamed, "fused": len(fused), "max_rank_bytes": most}
