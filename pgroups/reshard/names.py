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
with separate q / k / v and gate / up) into Megatron's fused layouts — locally on the source side
before the reshard: :func:`fuse_shards` builds each source rank's fused shards (interleaved per
query group, ``[Q;K;V]``, fused gate/up: whatever ``model`` says) from the separate ones it holds
(one copy of its own rows). :func:`separate_model` is the separate-named model (its shapes and
splits) separate shards follow.

Or inside the transfer, either way, with no copy: :func:`sub_block_model` is ``model`` with each
converted tensor cut into sub-blocks every layout stores whole (a query group's q heads, a K
head, a V head, gate, up); a reshard of it moves fused ↔ separate in one plan, each side passing
:func:`sub_block_views` of its own shards (contiguous row views), so the executor reads separate
tensors and writes the fused destination in place; bytes stay the fused reshard's lower bound.
The sub-blocks of Megatron's interleaved QKV and of ``[Q;K;V]`` are the same tensors, so the same
reshard converts one fused layout into the other (each side passing views of its own model's
shards).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

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


def check_one_to_one(model: ModelSpec, names: NameMap) -> None:
    """ConfigError naming both sources when ``names`` gives two tensors of ``model`` (or two roles
    of one fused tensor, or a renamed tensor and one it leaves alone) the same new name: one of
    them would be lost."""
    sources: Dict[str, str] = {}
    for spec in model.tensors:
        target = names.target(spec.name)
        pairs = [(target, repr(spec.name))] if isinstance(target, str) else [
            (new, f"{spec.name!r} (role {role})") for role, new in target.items()]
        for new, source in pairs:
            if new in sources:
                raise ConfigError(f"name map {names.name!r} sends both {sources[new]} and {source} to {new!r}; "
                                  "every new name must come from one tensor (or one role of a fused tensor)")
            sources[new] = source


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
    role it has no sub-block of, or two tensors sent to one name (:func:`check_one_to_one`)."""
    check_one_to_one(model, names)
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
    Raises ConfigError if a map names only some roles of a fused tensor, or sends two tensors to
    one name."""
    check_one_to_one(model, names)
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
    rows this rank's fused shard takes from it (a shard of another layout or TP rank), or when
    the map sends two tensors to one name."""
    check_one_to_one(model, names)
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


def conversion_report(model: ModelSpec, names: NameMap) -> Dict[str, Any]:
    """What converting under ``names`` inside the transfer involves: ``{"map", "renamed", "fused",
    "sub_blocks"}`` — tensors renamed, fused tensors split / fused by role, and the tensors of
    :func:`sub_block_model` they become."""
    converted = _converted(model, names)
    renamed = sum(1 for spec in model.tensors if names.target(spec.name) != spec.name)
    sub_blocks = sum(len(_sub_blocks(model[name])) for name in converted)
    return {"map": names.name, "renamed": renamed, "fused": len(converted), "sub_blocks": sub_blocks}


# ---- conversion inside the transfer: a reshard of sub-blocks, each side's tensors as views ---------------------
def _refine(block: Block, offset: int) -> List[Tuple[str, Block, int]]:
    """``[(name, block, row offset)]``: ``block`` (at ``offset`` in its tensor) cut into pieces
    every layout of the same weights stores whole: attention heads by query group (a K or V head
    is one group), other sub-blocks as they are. Each piece keeps the block's sharing rule."""
    if block.heads is None:
        return [(block.name, block, offset)]
    h = block.heads
    group = h.num_heads // h.num_kv_heads if h.role == "q" else 1
    first, stop = h.first, h.first + block.size // block.unit
    out = []
    for g in range(first // group, -(-stop // group)):
        lo, hi = max(first, g * group), min(stop, (g + 1) * group)
        name = f"{block_role(block)}{g}"
        out.append((name, attrs.evolve(block, size=(hi - lo) * block.unit, name=name, heads=attrs.evolve(h, first=lo)),
                    offset + (lo - first) * block.unit))
    return out


def _sub_blocks(spec: TensorSpec) -> List[Tuple[str, str, Block, int]]:
    """``[(sub-block tensor name, role, block, row offset in spec)]`` of a fused tensor, in one order
    for every layout of the same weights (by role, then query group): Megatron's interleaved QKV
    and ``[Q;K;V]`` give the same sub-blocks, so a reshard of them converts one into the other."""
    out, offset = [], 0
    for block in spec.blocks:
        out += [(f"{spec.name}[{name}]", block_role(block), piece, at) for name, piece, at in _refine(block, offset)]
        offset += block.size
    return sorted(out, key=lambda sub: (sub[1], sub[2].heads.first if sub[2].heads is not None else 0))


def _converted(model: ModelSpec, names: NameMap) -> Dict[str, Mapping[str, str]]:
    """``{fused tensor: {role: separate name}}`` of the tensors ``names`` splits by role; ConfigError
    if one cannot be converted in the transfer (its split dim is not dim 0: views would not be
    contiguous), or if it sends two tensors to one name."""
    check_one_to_one(model, names)
    out = {}
    for spec in model.tensors:
        target = names.target(spec.name)
        if isinstance(target, str):
            continue
        _roles(spec, target, names)
        if spec.tp_dim != 0:
            raise ConfigError(f"tensor {spec.name!r} is split on dim {spec.tp_dim}: converting it inside the transfer "
                              "needs dim 0 (its sub-blocks as contiguous row views); convert it locally with "
                              "fuse_shards / convert_shards instead")
        out[spec.name] = target
    return out


def sub_block_model(model: ModelSpec, names: NameMap) -> ModelSpec:
    """``model`` with every tensor that ``names`` splits by role replaced by its sub-blocks, one
    tensor each (``"<name>[q3]"``: query heads of group 3, ``[k3]``, ``[v3]``, ``[gate]``, ``[up]``),
    split over TP by the same rule. Both a fused and a separate layout of those weights hold each
    sub-block's shard as a contiguous run of rows, so a reshard of this model moves fused ↔
    separate (``names``' names) *in the transfer*: each side passes :func:`sub_block_views` of
    its own shards, the executor reads and writes those views, and the bytes stay those of the
    fused reshard (the lower bound). Raises ConfigError as :func:`separate_model`, or for a
    converted tensor not split on dim 0."""
    converted = _converted(model, names)
    specs: List[TensorSpec] = []
    for spec in model.tensors:
        if spec.name not in converted:
            specs.append(spec)
            continue
        for name, _, block, _ in _sub_blocks(spec):
            shape = (block.size,) + tuple(spec.shape[1:])
            specs.append(TensorSpec.create(name, shape, spec.dtype, 0, spec.layer, (block,), experts=spec.experts))
    return ModelSpec.create(specs, model.num_layers, f"{model.name} (sub-blocks of {names.name})")


def sub_block_views(shards: Mapping[str, torch.Tensor], model: ModelSpec, layout: ParallelLayout, rank: int,
                    names: NameMap, separate: bool) -> Dict[str, torch.Tensor]:
    """``rank``'s shards on ``layout`` as the tensors of :func:`sub_block_model` — views, no copy:
    writing into them (as the executor does on a destination) fills ``shards`` in place.

    ``separate=False``: ``shards`` are ``model``'s (fused layouts, model names); ``True``: they are
    the separate model's (:func:`separate_model`, ``names``' names). Raises ConfigError naming the
    tensor when a shard is missing or does not hold the rows this rank's share says."""
    converted = _converted(model, names)
    sep = {t.name: t for t in separate_model(model, names).tensors} if separate else {}
    result: Dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in shards:
            raise ConfigError(f"rank {rank}: tensor {name!r} is not among the shards given")
        return shards[name]

    for spec, tp, tp_size, ep, ep_size in held_tensors(layout, model, rank):
        target = names.target(spec.name)
        if spec.name not in converted:
            result[spec.name] = get(target if separate else spec.name)
            continue
        for storage in ([sep[n] for n in target.values()] if separate else [spec]):
            want = storage.local_shape(tp_size, tp, ep_size, ep, layout.vocab_multiple)
            if tuple(get(storage.name).shape) != want:
                raise ConfigError(f"rank {rank}: tensor {storage.name!r} has shape {tuple(get(storage.name).shape)}; "
                                  f"TP rank {tp} of {tp_size} holds {want}: give this rank's shards of that layout")
        role_offset: Dict[str, int] = {}
        role_start: Dict[int, int] = {}
        for block in spec.blocks:   # where each fused block starts in its role's separate tensor
            role = block_role(block)
            role_start[id(block)] = role_offset.get(role, 0)
            role_offset[role] = role_offset.get(role, 0) + block.size
        for name, role, block, at in _sub_blocks(spec):
            start, stop = block.share(tp_size, tp)
            if separate:
                owner = next(b for b in spec.blocks if b.size and _holds(spec, b, at))
                storage, global_start = sep[target[role]], role_start[id(owner)] + at - _offset(spec, owner) + start
                tensor = get(target[role])
            else:
                storage, global_start, tensor = spec, at + start, get(spec.name)
            local = _local_row(storage, tp_size, tp, global_start, stop - start)
            if local is None or local + stop - start > tensor.shape[0]:
                raise ConfigError(f"rank {rank}: tensor {storage.name!r} (shape {tuple(tensor.shape)}) does not hold "
                                  f"rows {global_start}..{global_start + stop - start} of TP rank {tp} of {tp_size}; "
                                  "give this rank's shards of that layout")
            result[name] = tensor.narrow(0, local, stop - start)
    return result


def _offset(spec: TensorSpec, block: Block) -> int:
    """Row offset of ``block`` in ``spec``."""
    offset = 0
    for b in spec.blocks:
        if b is block:
            return offset
        offset += b.size
    raise ValueError(block)


def _holds(spec: TensorSpec, block: Block, at: int) -> bool:
    """Whether row ``at`` of ``spec`` is in ``block``."""
    start = _offset(spec, block)
    return start <= at < start + block.size


def _local_row(spec: TensorSpec, tp_size: int, tp: int, global_start: int, rows: int) -> Optional[int]:
    """Where rows ``[global_start, +rows)`` of ``spec`` sit in TP rank ``tp``'s shard (0 rows: the
    position they would have), or None if the shard does not hold them contiguously."""
    for g0, g1, local in spec.pieces(tp_size, tp):
        if g0 <= global_start and global_start + rows <= g1:
            return local + global_start - g0
    return 0 if rows == 0 else None
