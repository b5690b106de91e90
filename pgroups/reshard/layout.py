"""A parallel layout: a pgroups :class:`~pgroups.topology.Topology` placed on a list of global ranks.

Layout rank ``i`` is global rank ``ranks[i]``; its (tp, pp, dp) coordinates are the
topology's for ``i``. So two layouts in one job can be colocated (the same ranks), disjoint
(a trainer on ranks 0-3, an inference engine on 4-7) or partially overlapping. Coordinates
and groups always come from the topology; this module only maps them to global ranks.

``stages`` says which transformer layers each pipeline stage holds: ``"even"`` (balanced
layer counts), ``"balanced"`` (balanced parameter bytes, counting embedding on the first
stage and head on the last), an explicit tuple of layer counts per stage, or any callable
``policy(num_stages, embedding_bytes, head_bytes, layer_bytes) -> layer counts``.

Where tensors live comes from the topology's meshes, the very ones pgroups builds its groups
from: dense tensors by the dense mesh (TP shard = ``tp``; every ``dp`` and ``cp`` rank of a stage
holds a full copy of its TP shard — context parallelism splits activations, not weights), routed
experts by the expert mesh (``etp`` · ``ep`` · ``edp`` · ``pp``, Megatron-Core's or InternEvo's
``expert_layout``): expert TP shard = ``etp``, experts owned = ``ep``, copies over ``edp``. So the
ranks holding expert e's shard k are exactly a group of the context's ``expert_data`` mode, and
each ``expert_tensor`` / ``expert`` group holds the shards / the experts of one copy. Expert
tensors of a topology without expert parallelism (ep 1, expert TP = TP) go by the dense mesh.

YAML: a pgroups config, with an optional ``placement:`` section::

    parallel: {tensor: 2, pipeline: 2, expert: 4, expert_tensor: 1, order: tp-cp-ep-dp-pp}
    placement:
      ranks: 4-7            # "0-3,8-11", a list [4, 5, 6, 7], or left out: ranks 0..size-1
      stages: balanced      # even (default) | balanced | [layers per stage]
      vocab_multiple: 128   # pad vocabularies as Megatron (default: unpadded, as HF / vLLM)
      # expert_parallel / expert_tensor: the same as parallel.expert / parallel.expert_tensor
      # isp: true           # a source holding WeightParallel's (ISP) shards: needs parallel.weight
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attrs

from ..ranks import format_rank_spec
from ..ranks import parse_ranks
from ..config import Config, config_from_dict, read_yaml
from ..errors import ConfigError, allowed, did_you_mean, reject_unknown_keys
from ..topology import Topology
from .spec import EMBEDDING, HEAD, TIED, Block, LayerRef, ModelSpec, TensorSpec, balanced_share

StagePolicy = Callable[[int, int, int, Sequence[int]], Sequence[int]]
Stages = Union[str, Tuple[int, ...], StagePolicy]

_PLACEMENT_KEYS = ("ranks", "stages", "expert_parallel", "expert_tensor", "vocab_multiple", "isp")
#: placement keys that are another name of a ``parallel:`` key
_PLACEMENT_ALIASES = {"expert_parallel": "expert", "expert_tensor": "expert_tensor"}


# ---- stage policies (pure) -----------------------------------------------------------------------
def even_stages(num_stages: int, embedding_bytes: int, head_bytes: int, layer_bytes: Sequence[int]) -> List[int]:
    """Layer counts per stage, as equal as possible (the first stages take the remainder)."""
    return [stop - start for start, stop in (balanced_share(len(layer_bytes), num_stages, s)
                                             for s in range(num_stages))]


def balanced_stages(num_stages: int, embedding_bytes: int, head_bytes: int,
                    layer_bytes: Sequence[int]) -> List[int]:
    """Contiguous layer counts per stage minimising the largest stage's bytes (embedding counted
    on stage 0, head on the last). Binary search on the capacity with a greedy fill, which is
    optimal for contiguous partitions."""
    def fill(capacity: int) -> Optional[List[int]]:
        counts, i = [], 0
        for stage in range(num_stages):
            load = (embedding_bytes if stage == 0 else 0) + (head_bytes if stage == num_stages - 1 else 0)
            if load > capacity:
                return None
            start = i
            if stage == num_stages - 1:
                i = len(layer_bytes)
                load += sum(layer_bytes[start:])
                if load > capacity:
                    return None
            else:
                while i < len(layer_bytes) and load + layer_bytes[i] <= capacity:
                    load += layer_bytes[i]
                    i += 1
            counts.append(i - start)
        return counts

    low = max([embedding_bytes, head_bytes, *layer_bytes], default=0)
    high = embedding_bytes + head_bytes + sum(layer_bytes)
    while low < high:
        mid = (low + high) // 2
        if fill(mid) is None:
            low = mid + 1
        else:
            high = mid
    return fill(low)


#: the named policies a YAML ``stages:`` may give
STAGE_POLICIES: Mapping[str, StagePolicy] = {"even": even_stages, "balanced": balanced_stages}


# ---- the layout ---------------------------------------------------------------------------------
def with_experts(topology: Topology, expert: Optional[int] = None, expert_tensor: Optional[int] = None,
                 expert_layout: Optional[str] = None, where: str = "") -> Topology:
    """``topology`` with its expert sizes / expert layout replaced (None keeps the topology's):
    the topology a config with those ``parallel:`` keys gives, validated as it would be (a
    ConfigError prefixed with ``where`` otherwise)."""
    t = topology
    try:
        return Topology.create(t.world_size, t.tensor, t.pipeline, t.data, t.zero1, t.nettest, "-".join(t.order),
                               context=t.context, weight=t.weight, virtual_pipeline=t.virtual_pipeline,
                               expert=t.expert if expert is None else expert,
                               expert_tensor=t.expert_tensor if expert_tensor is None else expert_tensor,
                               expert_layout=t.expert_layout if expert_layout is None else expert_layout)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


@attrs.frozen
class ParallelLayout:
    """``topology`` placed on global ``ranks`` (layout rank i → ``ranks[i]``). Build with :meth:`create`."""

    topology: Topology
    ranks: Tuple[int, ...]
    stages: Stages = "even"
    name: str = ""
    vocab_multiple: Optional[int] = None
    isp: bool = False
    _index: Dict[int, int] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_index", {r: i for i, r in enumerate(self.ranks)})

    @classmethod
    def create(cls, topology: Topology, ranks: Optional[Sequence[int]] = None, stages: Stages = "even",
               name: str = "", expert_parallel: Optional[int] = None, expert_tensor: Optional[int] = None,
               vocab_multiple: Optional[int] = None, expert_layout: Optional[str] = None,
               isp: bool = False) -> "ParallelLayout":
        """Validate and build. ``ranks`` default to ``0..topology.world_size-1``. Routed experts
        are placed by ``topology``'s expert mesh (see the module docstring), so
        ``ParallelLayout.create(gpc.topology)`` places them as the context's expert groups are.
        ``expert_parallel`` / ``expert_tensor`` / ``expert_layout``, when given, are a convenience:
        the topology is rebuilt with ``expert`` / ``expert_tensor`` / ``expert_layout`` set so (the
        mesh a config with those keys gives, under the same validation). ``vocab_multiple`` pads
        vocabulary tensors as Megatron's ``make_vocab_size_divisible_by`` does (None: unpadded, as
        HF / vLLM checkpoints). ``isp``: the weights are held as ``pgroups.comm``'s WeightParallel
        (ISP) holds them — every tensor split by tensor parallelism is instead split along dim 0
        (``out_features`` of a linear, the rows of an embedding) over the topology's ``weight``
        group in ``torch.tensor_split`` pieces, fused sub-blocks and vocabulary padding ignored;
        other tensors whole on every rank of a stage (:func:`isp_spec`). A source layout only.

        Raises ConfigError if the ranks are not distinct non-negative integers, one per layout
        rank, ``stages`` is not a known policy / a tuple of counts / a callable, or the expert
        sizes do not fit the topology (the topology's own message: e.g. EP x expert TP must divide
        the ranks of a pipeline stage; Megatron's expert mesh needs ``ep`` in the order).
        """
        where = f"{name}: " if name else ""
        if vocab_multiple is not None and (isinstance(vocab_multiple, bool) or not isinstance(vocab_multiple, int)
                                           or vocab_multiple < 1):
            raise ConfigError(f"{where}vocab_multiple must be a positive integer, got {vocab_multiple!r}")
        if (expert_parallel, expert_tensor, expert_layout) != (None, None, None):
            topology = with_experts(topology, expert_parallel, expert_tensor, expert_layout, where)
        ranks = tuple(range(topology.world_size)) if ranks is None else tuple(ranks)
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
            raise ConfigError(f"{where}placement ranks must be non-negative integers, got {list(ranks)}")
        if len(set(ranks)) != len(ranks):
            raise ConfigError(f"{where}placement ranks must be distinct, got {list(ranks)}")
        if len(ranks) != topology.world_size:
            context = f" * context({topology.context})" if topology.context > 1 else ""
            raise ConfigError(f"{where}placement has {len(ranks)} ranks but tensor({topology.tensor}){context} * "
                              f"pipeline({topology.pipeline}) * data({topology.data}) = {topology.world_size}")
        if isinstance(stages, str):
            if stages not in STAGE_POLICIES:
                raise ConfigError(f"{where}stages {stages!r} is not a known policy"
                                  f"{did_you_mean(stages, STAGE_POLICIES)}; allowed: {allowed(STAGE_POLICIES)}, "
                                  "a list of layer counts per stage, or a callable")
        elif isinstance(stages, (list, tuple)):
            if len(stages) != topology.pipeline or not all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in stages):
                raise ConfigError(f"{where}stages {list(stages)} must list one non-negative layer count per "
                                  f"pipeline stage ({topology.pipeline} stages)")
            stages = tuple(stages)
        elif not callable(stages):
            raise ConfigError(f"{where}stages must be a policy name, a list of layer counts or a callable, "
                              f"got {stages!r}")
        if isp and (not topology.isp_enabled or vocab_multiple is not None):
            raise ConfigError(f"{where}isp: true needs weight parallelism (parallel.weight) and no vocab_multiple "
                              "(WeightParallel shards hold their rows exactly, padding only in its buffers)")
        return cls(topology, ranks, stages, name, vocab_multiple, bool(isp))

    @classmethod
    def from_config(cls, config: Config, world_size: Optional[int] = None, ranks: Optional[Sequence[int]] = None,
                    stages: Stages = "even", name: str = "", expert_parallel: Optional[int] = None,
                    expert_tensor: Optional[int] = None, vocab_multiple: Optional[int] = None,
                    isp: bool = False) -> "ParallelLayout":
        """The layout of ``config.parallel`` on ``ranks`` (default: ranks 0..n-1 of a job of
        ``world_size``; ``data`` is derived from the number of ranks when the config leaves it out;
        experts placed by the config's ``expert`` / ``expert_tensor`` / ``expert_layout``)."""
        size = len(ranks) if ranks is not None else world_size
        if size is None:
            raise ConfigError(f"{name or config.source or 'layout'}: give the world size or the placement ranks")
        return cls.create(config.topology(size), ranks, stages, name or config.source or "",
                          expert_parallel, expert_tensor, vocab_multiple, isp=isp)

    @property
    def expert_parallel(self) -> int:
        """EP size of routed-expert tensors (the topology's ``expert``)."""
        return self.mesh_sizes(True)[1]

    @property
    def expert_tensor(self) -> int:
        """Expert TP size (the topology's ``expert_tensor``; TP when expert parallelism is off)."""
        return self.mesh_sizes(True)[0]

    # ---- ranks --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.ranks)

    def __contains__(self, global_rank: int) -> bool:
        return global_rank in self._index

    def layout_rank(self, global_rank: int) -> int:
        """The position of ``global_rank`` in this layout (KeyError if it is not placed here)."""
        return self._index[global_rank]

    def global_rank(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """The global rank at layout coordinates (tp, pp, dp, cp)."""
        return self.ranks[self.topology.rank_at(tp, pp, dp, cp)]

    def coordinates(self, global_rank: int) -> Optional[Dict[str, int]]:
        """``{"tp", "pp", "dp"}`` (and ``"cp"`` when the order names it) of ``global_rank`` in this
        layout, or None if it is not placed here."""
        index = self._index.get(global_rank)
        return None if index is None else self.topology.coordinates(index)

    def replicas(self, tp: int, pp: int) -> List[int]:
        """Global ranks holding TP shard ``tp`` of stage ``pp``: its data- and context-parallel group."""
        return [self.ranks[i] for i in self.topology.group_along(self.topology.rank_at(tp, pp, 0), ("dp", "cp"))]

    # ---- meshes: where dense and expert tensors live ---------------------------------------------
    def _experts_on_expert_mesh(self, expert: bool) -> bool:
        return expert and self.topology.expert_enabled

    def mesh_sizes(self, expert: bool = False) -> Tuple[int, int, int]:
        """``(tp size, ep size, copies)`` of a stage: dense ``(tensor, 1, data * context)``;
        expert ``(expert_tensor, expert, expert_data)`` of the topology's expert mesh (the dense
        sizes when expert parallelism is off)."""
        t = self.topology
        if self._experts_on_expert_mesh(expert):
            return t.expert_tensor, t.expert, t.expert_data
        if self.isp and not expert:
            return t.weight, 1, t.weight_data
        return t.tensor, 1, t.data * t.context

    def mesh_coordinates(self, global_rank: int, expert: bool = False) -> Optional[Tuple[int, int, int, int]]:
        """``(tp, ep, copy, pp)`` of ``global_rank`` (None if it is not placed here).

        Dense: ``(tp, 0, dp + data * cp, pp)`` from the dense mesh — data and context ranks hold
        the same weights. Expert: ``(etp, ep, edp, pp)`` from the topology's expert mesh, the one
        its ``expert`` / ``expert_tensor`` / ``expert_data`` groups come from.
        """
        index = self._index.get(global_rank)
        if index is None:
            return None
        t = self.topology
        if self._experts_on_expert_mesh(expert):
            c = t.expert_mesh.coordinates(index)
            return c["etp"], c["ep"], c["edp"], c["pp"]
        if self.isp and not expert:
            c = t.weight_mesh.coordinates(index)
            return c["wp"], 0, c["wdp"], c["pp"]
        c = t.dense.coordinates(index)
        return c["tp"], 0, c["dp"] + t.data * c["cp"], c["pp"]

    def mesh_rank(self, tp: int, ep: int, replica: int, pp: int, expert: bool = False) -> int:
        """The global rank at mesh coordinates (the inverse of :meth:`mesh_coordinates`)."""
        t = self.topology
        if self._experts_on_expert_mesh(expert):
            return self.ranks[t.expert_mesh.rank_at({"etp": tp, "ep": ep, "edp": replica, "pp": pp})]
        if self.isp and not expert:
            return self.ranks[t.weight_mesh.rank_at({"wp": tp, "wdp": replica, "pp": pp})]
        return self.ranks[t.dense.rank_at({"tp": tp, "pp": pp, "dp": replica % t.data, "cp": replica // t.data})]

    # ---- pipeline stages ------------------------------------------------------------------------
    def layer_counts(self, model: ModelSpec) -> Tuple[int, ...]:
        """Layers per pipeline stage for ``model`` under this layout's stage policy.

        Raises ConfigError if an explicit list or a policy's answer does not add up.
        """
        pipeline = self.topology.pipeline
        if isinstance(self.stages, tuple):
            counts = self.stages
        else:
            policy = STAGE_POLICIES[self.stages] if isinstance(self.stages, str) else self.stages
            embedding, head, per_layer = model.layer_bytes()
            counts = tuple(policy(pipeline, embedding, head, per_layer))
        if len(counts) != pipeline or sum(counts) != model.num_layers or min(counts, default=0) < 0:
            raise ConfigError(f"{self.name + ': ' if self.name else ''}stages {list(counts)} must give "
                              f"{pipeline} non-negative layer counts adding up to num_layers "
                              f"({model.num_layers}) of model {model.name!r}")
        return tuple(counts)

    def stage_map(self, model: ModelSpec) -> Dict[LayerRef, int]:
        """``{layer: stage}`` for ``model``: embedding → 0, head → last, layers by :meth:`layer_counts`
        (a tied tensor is on both ends: see :func:`layer_stages`)."""
        result: Dict[LayerRef, int] = {EMBEDDING: 0, HEAD: self.topology.pipeline - 1, TIED: 0}
        layer = 0
        for stage, count in enumerate(self.layer_counts(model)):
            for _ in range(count):
                result[layer] = stage
                layer += 1
        return result

    def describe(self) -> str:
        t = self.topology
        stages = self.stages if isinstance(self.stages, (str, tuple)) else getattr(self.stages, "__name__", "custom")
        experts = (f", experts: etp {t.expert_tensor} x ep {t.expert} x edp {t.expert_data} "
                   f"({t.expert_layout} layout)" if t.expert_enabled else "")
        if self.vocab_multiple:
            experts += f", vocab padded to a multiple of {self.vocab_multiple} x tensor"
        if self.isp:
            experts += f", ISP weights: split on dim 0 over weight {t.weight} x weight_data {t.weight_data}"
        context = f" x context {t.context}" if t.context > 1 else ""
        return (f"tensor {t.tensor}{context} x pipeline {t.pipeline} x data {t.data} (order {'-'.join(t.order)}) "
                f"on ranks {format_rank_spec(self.ranks)}, stages {stages}{experts}")


# ---- shards of a layout -------------------------------------------------------------------------
def layer_stages(stage_map: Mapping[LayerRef, int], layer: LayerRef) -> Tuple[int, ...]:
    """The stages holding ``layer``: one, or the first and last for a tied tensor (one when they
    are the same stage)."""
    if layer == TIED:
        return (0,) if stage_map[HEAD] == 0 else (0, stage_map[HEAD])
    return (stage_map[layer],)


def held_tensors(layout: ParallelLayout, model: ModelSpec,
                 global_rank: int) -> List[Tuple[TensorSpec, int, int, int, int]]:
    """``[(spec, tp, tp size, ep, ep size)]`` for every tensor ``global_rank`` holds in ``layout``
    (the tensors of its pipeline stage; per-expert tensors only on their owner), in model order;
    empty if the rank is not placed in the layout. Expert tensors use the expert mesh."""
    if global_rank not in layout:
        return []
    stages = layout.stage_map(model)
    mesh = {expert: layout.mesh_coordinates(global_rank, expert) for expert in (False, True)}
    sizes = {expert: layout.mesh_sizes(expert) for expert in (False, True)}
    result = []
    for spec in model.tensors:
        tp, ep, _, pp = mesh[spec.is_expert]
        tp_size, ep_size, _ = sizes[spec.is_expert]
        if pp in layer_stages(stages, spec.layer) and spec.held_by(ep_size, ep):
            result.append((isp_spec(spec) if layout.isp else spec, tp, tp_size, ep, ep_size))
    return result


def isp_spec(spec: TensorSpec) -> TensorSpec:
    """How an ISP (weight-parallel) layout holds ``spec``: a tensor that tensor parallelism splits
    is split along dim 0 in plain balanced pieces (``torch.tensor_split``, as ``pgroups.comm``'s
    WeightParallel shards a linear's ``out_features`` or an embedding's rows), with no fused
    sub-blocks and no vocabulary padding; a replicated one, or a routed expert, as it is."""
    if spec.tp_dim is None or spec.is_expert:
        return spec
    return TensorSpec(spec.name, spec.shape, spec.dtype, 0, spec.layer, (Block(spec.shape[0]),), None, False)


def local_shapes(layout: ParallelLayout, model: ModelSpec, global_rank: int) -> Dict[str, Tuple[int, ...]]:
    """``{tensor name: local shard shape}`` for every tensor ``global_rank`` holds in ``layout``
    (see :func:`held_tensors`); empty if the rank is not placed in the layout."""
    return {spec.name: spec.local_shape(tp_size, tp, ep_size, ep, layout.vocab_multiple)
            for spec, tp, tp_size, ep, ep_size in held_tensors(layout, model, global_rank)}


def cut_shards(layout: ParallelLayout, model: ModelSpec, global_rank: int,
               full: Callable[[str], "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """The shards ``global_rank`` holds in ``layout``, cut from full tensors (``full(name)``,
    e.g. ``state_dict.__getitem__``): the reference every reshard result must equal."""
    return {spec.name: spec.shard(full(spec.name), tp_size, tp, ep_size, ep, layout.vocab_multiple)
            for spec, tp, tp_size, ep, ep_size in held_tensors(layout, model, global_rank)}


def empty_shards(layout: ParallelLayout, model: ModelSpec, global_rank: int,
                 device: Any = "cpu", fill: Optional[float] = None) -> Dict[str, "torch.Tensor"]:
    """Freshly allocated shards for ``global_rank`` in ``layout`` (uninitialised, or ``fill``)."""
    import torch

    result, dtypes = {}, {spec.name: spec.dtype for spec in model.tensors}
    for name, shape in local_shapes(layout, model, global_rank).items():
        tensor = torch.empty(shape, dtype=dtypes[name], device=device)
        if fill is not None:
            tensor.fill_(fill)
        result[name] = tensor
    return result


# ---- YAML --------------------------------------------------------------------------------------
def model_layout(config: Union[str, "os.PathLike[str]", Mapping[str, Any], Config], world_size: int,
                 model: str) -> ParallelLayout:
    """The layout of ``model`` in a config with ``models:``: its topology placed on its ranks (what
    ``ParallelLayout.create(gpc.model(model).topology, gpc.model(model).ranks)`` gives at run time).
    ConfigError for an unknown model (with a did-you-mean) or a bad placement."""
    from ..config import load_config
    from ..models import unknown_model

    cfg = load_config(config)
    if model not in cfg.models:
        raise unknown_model(model, cfg.models)
    where = f"{cfg.source}: " if cfg.source else ""
    spec = cfg.models[model]
    return ParallelLayout.create(spec.topology(world_size, cfg.source), spec.placement(world_size, where))


def load_layout(obj: Union[str, "os.PathLike[str]", Mapping[str, Any]], world_size: int,
                name: Optional[str] = None) -> ParallelLayout:
    """A layout from a pgroups config (path, YAML string or mapping) with optional ``placement:``.

    Without placement ranks the layout covers ranks ``0..world_size-1``. Every rank must be
    below ``world_size``. Raises ConfigError naming the file and the key.
    """
    if isinstance(obj, Mapping):
        data, source = dict(obj), name or "<layout>"
    else:
        data, source = read_yaml(obj, "layout", name)
        data = data or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a layout must be a pgroups config mapping, got {type(data).__name__}")
        data = dict(data)
    where = f"{source}: "
    placement = data.pop("placement", None) or {}
    if not isinstance(placement, Mapping):
        raise ConfigError(f"{where}placement must be a mapping with {allowed(_PLACEMENT_KEYS)}, got {placement!r}")
    reject_unknown_keys(placement, _PLACEMENT_KEYS, "placement.", where)
    for key, parallel_key in _PLACEMENT_ALIASES.items():
        if key in placement:
            parallel = data.get("parallel")
            parallel = dict(parallel) if isinstance(parallel, Mapping) else {}
            if parallel_key in parallel and parallel[parallel_key] != placement[key]:
                raise ConfigError(f"{where}placement.{key}({placement[key]!r}) contradicts parallel.{parallel_key}"
                                  f"({parallel[parallel_key]!r}); give it once, in parallel:")
            parallel[parallel_key] = placement[key]
            data["parallel"] = parallel
    config = config_from_dict(data, source)
    ranks = parse_ranks(placement["ranks"], f"{where}placement.ranks") if "ranks" in placement else None
    if ranks is not None:
        outside = [r for r in ranks if r >= world_size]
        if outside:
            raise ConfigError(f"{where}placement.ranks {outside} are outside the job's ranks 0..{world_size - 1}")
    stages = placement.get("stages", "even")
    if isinstance(stages, list):
        stages = tuple(stages)
    return ParallelLayout.from_config(config, world_size, ranks, stages, source,
                                      vocab_multiple=placement.get("vocab_multiple"), isp=placement.get("isp", False))
