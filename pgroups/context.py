"""ParallelContext: the lifecycle of one job's groups and every query about them, by mode.

``gpc`` (in :mod:`pgroups`) is the module-level instance. The context asks initializers which
ranks form each mode's groups, asks :mod:`pgroups.backend` to create them, and answers
queries; asking about a mode that was not built raises ModeNotInitializedError — never a
silent 0/1 or the world group.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import attrs
import torch.distributed as dist

from . import exports, torch_private, virtual_pipeline
from .backend import (GroupBackend, ProcessGroup, check_lazy_creation, choose_strategy,
                      creation_is_world_collective, resolve_device_backend)
from .config import Config, ConfigLike, load_config
from .errors import LaunchError, ModeNotInitializedError, allowed, did_you_mean
from .creation import shared_owner, sharing_key
from .handle import GroupHandle
from .mode_plan import import_plugins, make_initializers  # noqa: F401  (the pure decisions; also imported from here)
from .initializer import (BuiltinInitializer, InitializerRegistry, ProcessGroupInitializer, check_group_of,
                          checked_initializer_call, default_registry, describe_initializer)
from .launch import LaunchInfo, create_store, from_environment, init_distributed
from .models import PlacedInitializer, unknown_model
from .modes import ModeLike, canonical_name, with_aliases
from .nccl_options import options_by_mode
from .ranks import format_ranks
from .topology import CLASSIC_MODES, RankGroups, Topology

#: Built-in modes every context builds, in creation order (the same on every rank), by canonical
#: name. A layout adds the modes of the axes it uses (Topology.default_modes), a config those it lists.
BUILTIN_MODES = CLASSIC_MODES


@attrs.define
class ModeState:
    """What the context knows about one built mode on this rank."""

    mode: str
    initializer: ProcessGroupInitializer
    ranks: Optional[List[int]]            # this rank's group, sorted; None if in none
    owner: "ParallelContext"              # the context (or model) that holds this mode
    source: Optional["ModeState"] = None  # an earlier mode (of any model) with identical groups
    group: Optional[ProcessGroup] = None
    cpu_group: Optional[ProcessGroup] = None
    built: bool = False
    cpu_built: bool = False
    released: bool = False
    all_groups: Optional[RankGroups] = None  # cached by the all/split strategies

    @property
    def shares_with(self) -> Optional[str]:
        """The mode whose communicators this one reuses (``model.mode`` across models), or None."""
        if self.source is None:
            return None
        same = self.source.owner is self.owner
        return self.source.mode if same else f"{self.source.owner.model_name}.{self.source.mode}"

    @property
    def backend_name(self) -> str:
        """The name the backend knows this mode by: ``mode``, or ``model:mode`` in a model."""
        model = self.owner.model_name
        return self.mode if model is None else f"{model}:{self.mode}"


class ParallelContext:
    """Process groups by parallel mode. See the package README for the full query list."""

    #: The model this context answers for (None: the whole job). See :meth:`model`.
    model_name: Optional[str] = None

    def __init__(self, registry: Optional[InitializerRegistry] = None) -> None:
        self.registry = registry or default_registry
        # The rendezvous store this context started torch.distributed with, kept across
        # destroy(): a re-init reuses rank 0's running server (a fresh key prefix each time)
        # instead of racing its shutdown and restart on the same port.
        self._store: Optional[Tuple[LaunchInfo, Any]] = None
        self._reset()

    def _reset(self) -> None:
        self.config: Optional[Config] = None
        self.topology: Optional[Topology] = None
        self.backend: Optional[GroupBackend] = None
        self.launch: Optional[LaunchInfo] = None
        self._rank = -1
        self._modes: Dict[str, ModeState] = {}
        self._owns_default_group = False
        self._hostnames: Optional[List[str]] = None
        self._models: Dict[str, "ModelContext"] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def init_from_config(self, config: ConfigLike, launch: Optional[LaunchInfo] = None) -> "ParallelContext":
        """Validate ``config`` (path, YAML string, dict or Config), start torch.distributed from
        ``launch`` or the environment if it is not started, and build the groups.

        Everything that can be checked without communication is checked first (ConfigError).
        Raises RuntimeError if already initialized (call destroy() first). When torch.distributed
        is already started, ``launch`` cannot start it: a ``launch`` whose rank or world size
        differs from the running job raises LaunchError, a matching one is ignored with a warning.
        """
        if self.is_initialized():
            raise RuntimeError("the parallel context is already initialized; call destroy() first")
        cfg = load_config(config)
        import_plugins(cfg)
        if dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
            if launch is not None:
                _check_launch_matches(launch, rank, world_size)
        else:
            launch = launch or from_environment()
            world_size, rank = launch.world_size, launch.rank
        if cfg.models:  # the job's own modes: the world; each model's layout on its ranks
            topology = Topology.create(world_size)
            initializers = {"global": self.registry.create("global")}
            from .mode_plan import plan_models

            model_plans = plan_models(self.registry, cfg, world_size)
        else:
            topology = cfg.topology(world_size)
            initializers = self._make_initializers(cfg, topology)
            model_plans = {}
        init_store = None
        if not dist.is_initialized():
            assert launch is not None
            init_store = self._rendezvous_store(launch, cfg)
            init_distributed(launch, cfg.backend, cfg.timeout_s, store=init_store)
            self._owns_default_group = True
        try:  # from here on, a failure rolls everything back
            self.launch = launch
            self.config, self.topology, self._rank = cfg, topology, rank
            device_backend = resolve_device_backend(cfg.backend)
            options = options_by_mode(cfg.nccl_options, initializers, canonical_name)
            for name, (_, _, model_inits, model_options) in model_plans.items():
                options.update({f"{name}:{mode}": value for mode, value in model_options.items()})
            self.backend = GroupBackend(device_backend, choose_strategy(cfg.strategy, device_backend),
                                        cfg.timeout_s, nccl_options=options,
                                        store=creation_store(device_backend, init_store, rank),
                                        creation_timeout_s=cfg.creation_deadline_s)
            check_lazy_creation(cfg.groups, self.backend.strategy,
                                creation_is_world_collective(device_backend))
            layouts: Dict[Hashable, ModeState] = {}  # identical groups share a communicator, across models too
            self._register_modes(initializers, layouts)
            if model_plans:
                from .model_context import ModelContext
            for name, (ranks, model_topology, model_inits, _) in model_plans.items():
                self._models[name] = ModelContext(self, name, ranks, model_topology)
                self._models[name]._register_modes(model_inits, layouts)
            for ctx in [self, *self._models.values()]:
                ctx._build_eager()
            if cfg.cpu_groups == "lazy" and self.backend.world_cpu_group_needs_creation():
                # The world's CPU group needs every rank; later callers (hostnames, CPU-tensor
                # exchanges) may be a subset, so it is built now, while every rank is here.
                self._cpu_group("global")
        except BaseException:
            self.destroy(sync=False)  # never leave a half-built context behind: a retry starts clean
            raise
        return self

    def _register_modes(self, initializers: Dict[str, ProcessGroupInitializer],
                        layouts: Dict[Hashable, ModeState]) -> None:
        """Add a ModeState per mode; a mode whose layout key (and NCCL options) equals an earlier
        mode's — of this context or another model — reuses that mode's communicators."""
        for name, init in initializers.items():
            state = ModeState(name, init, own_group(init, self.topology, self._rank), owner=self)
            key = sharing_key(init.layout_key(self.topology), self.backend.options_key(state.backend_name))
            state.source = shared_owner(layouts, key, state)
            self._modes[name] = state

    def _takes_part(self) -> bool:
        """Whether this rank enters this context's creation steps: always for the job; for a
        model, its ranks — and every rank where creation is collective over the world."""
        return True

    def _build_eager(self) -> None:
        """Create the groups the config builds at init, in mode order (collective: see backend)."""
        if not self._takes_part():
            return
        if self.config.groups == "eager":
            for name in self._modes:
                self._device_group(name)
        if self.config.cpu_groups == "eager":
            for name in self._modes:
                self._cpu_group(name)

    def _rendezvous_store(self, launch: LaunchInfo, cfg: Config) -> Any:
        if self._store is None or self._store[0] != launch:
            self._store = (launch, create_store(launch, cfg.timeout_s))
        # Every rank counts its own inits on the server: the counts agree across ranks, and no
        # init reads keys an earlier one left (even one by another context sharing the server).
        generation = self._store[1].add(f"pgroups/inits/rank{launch.rank}", 1)
        return dist.PrefixStore(f"pgroups/init{generation}", self._store[1])

    def _make_initializers(self, cfg: Config, topology: Topology) -> Dict[str, ProcessGroupInitializer]:
        return make_initializers(self.registry, cfg, topology)

    def destroy(self, sync: bool = True) -> None:
        """Destroy every group (and the default group if this context started it). Idempotent.

        Safe right after collectives: with ``sync`` (default) every rank of the job first meets
        the others through the store (at most the creation deadline, ``creation_timeout_s``), so
        no rank closes its connections while a peer is still inside a collective with it. A peer
        that never arrives gives a warning naming it, and the teardown goes on. Pass
        ``sync=False`` after a failure (a dead or hung peer), where waiting would only delay.
        """
        if sync and self.backend is not None and self.topology is not None:
            reason = self.backend.settle(self._rank, dist.get_world_size() if dist.is_initialized() else 1)
            if reason is not None:
                warnings.warn(f"destroy(): {reason}; destroying anyway", RuntimeWarning, stacklevel=2)
        if self.backend is not None:
            self.backend.destroy()
        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
        self._reset()

    # ---- state --------------------------------------------------------------------------
    def is_initialized(self, mode: Optional[ModeLike] = None) -> bool:
        """Whether the context is built (and, given ``mode``, whether that mode is)."""
        if mode is None:
            return self.topology is not None
        return canonical_name(mode) in self._modes

    @property
    def modes(self) -> List[str]:
        """The modes this context built, in creation order, by canonical name (``"tp"``, not ``"tensor"``)."""
        return list(self._modes)

    def _state(self, mode: ModeLike) -> ModeState:
        name = canonical_name(mode)
        if self.topology is None:
            raise ModeNotInitializedError(
                f"cannot query mode {name!r}: the parallel context is not initialized "
                "(call gpc.init_from_config(...) first)")
        try:
            return self._modes[name]
        except KeyError:
            if self._models:
                raise ModeNotInitializedError(
                    f"mode {name!r}: this config has several models ({allowed(self._models)}); ask one, "
                    f"e.g. gpc.model({next(iter(self._models))!r}).get_group({name!r})") from None
            raise ModeNotInitializedError(
                f"mode {name!r} was not built{did_you_mean(name, with_aliases(self._modes))}; built modes: "
                f"{allowed(self._modes)} (add your own under extra_modes:)") from None

    def _member_state(self, mode: ModeLike) -> ModeState:
        state = self._state(mode)
        if state.ranks is None:
            raise ModeNotInitializedError(f"rank {self._rank} is not a member of any {state.mode!r} group")
        return state

    # ---- models ---------------------------------------------------------------------------
    def model(self, name: str) -> "ModelContext":
        """The context of the config's model ``name`` (``models:``): every query of this class, for
        that model's layout, in global ranks. ConfigError with a did-you-mean for an unknown name."""
        self._require()
        if name not in self._models:
            raise unknown_model(name, self._models)
        return self._models[name]

    @property
    def model_names(self) -> List[str]:
        """The config's models, in config order (empty for a single-layout config)."""
        return list(self._models)

    # ---- groups ---------------------------------------------------------------------------
    def get_group(self, mode: ModeLike) -> ProcessGroup:
        """This rank's device group of ``mode`` (NCCL on GPUs, gloo on CPU).

        Lazily built groups are created here: collective over the group's members.
        """
        return self._device_group(self._member_state(mode).mode)

    def get_cpu_group(self, mode: ModeLike) -> ProcessGroup:
        """This rank's CPU (gloo) group of ``mode``; the device group itself when that is gloo."""
        state = self._member_state(mode)
        if self.config is not None and self.config.cpu_groups == "off" and self.backend.cpu_twin_needed:
            raise ModeNotInitializedError(
                f"CPU groups are off in this config (cpu_groups: off); mode {state.mode!r} has none")
        return self._cpu_group(state.mode, lazy=True)

    def _device_group(self, name: str) -> Optional[ProcessGroup]:
        state = self._modes[name]
        if not state.built:
            self._check_rebuild(state)
            if state.source is not None:
                state.group = state.source.owner._device_group(state.source.mode)
            else:
                state.group = self.backend.build(state.backend_name, state.ranks, self._lister(state))
            state.built = True
        return state.group

    def _check_rebuild(self, state: ModeState) -> None:
        """A released mode is rebuilt on request only where its members can create it alone."""
        if state.released and self.backend.strategy != "local":
            raise ModeNotInitializedError(
                f"mode {state.mode!r} of model {self.model_name!r} was released, and creating groups here "
                f"is collective over the world (strategy {self.backend.strategy!r}): call "
                f"gpc.model({self.model_name!r}).rebuild() on every rank first")

    def _cpu_group(self, name: str, lazy: bool = False) -> Optional[ProcessGroup]:
        """``lazy``: requested after init, by the members only — so created members-only."""
        state = self._modes[name]
        if not state.cpu_built:
            if not self.backend.cpu_twin_needed:
                state.cpu_group = self._device_group(name)
            elif state.source is not None:
                state.cpu_group = state.source.owner._cpu_group(state.source.mode, lazy)
            else:
                self._device_group(name)  # device first: members create twins in one order
                state.cpu_group = self.backend.build(state.backend_name, state.ranks, self._lister(state),
                                                     cpu=True, strategy="local" if lazy else None)
            state.cpu_built = True
        return state.cpu_group

    def _lister(self, state: ModeState):
        """Lists the mode's groups once, for strategies where every rank takes part."""
        def all_groups() -> RankGroups:
            if state.all_groups is None:
                state.all_groups = state.initializer.rank_groups(self.topology)
            return state.all_groups
        return all_groups

    def group(self, mode: ModeLike) -> GroupHandle:
        """One immutable handle on this rank's ``mode`` group: device group, CPU group, ranks,
        this rank's position, size, device, label (:class:`pgroups.handle.GroupHandle`). Creates
        what is still lazy, like get_group / get_cpu_group (collective over the group's members)."""
        state = self._member_state(mode)
        twins_off = self.config.cpu_groups == "off" and self.backend.cpu_twin_needed
        return GroupHandle(state.mode, self._device_group(state.mode),
                           None if twins_off else self._cpu_group(state.mode, lazy=True),
                           tuple(state.ranks), state.ranks.index(self._rank), self.backend.device_for_tensors(),
                           self.model_name)

    def group_for_rank_lists(self, name: str, rank_groups: Sequence[Sequence[int]], shown_as: str,
                             kind: str) -> Optional[GroupHandle]:
        """Create device groups for disjoint rank lists that are no mode (the network test's
        intra-node and one-rank-per-host groups) and return this rank's as a
        :class:`~pgroups.handle.GroupHandle` labelled ``kind shown_as`` (None if it is in none).

        Collective: every rank calls it with the same lists in the same order; ``name`` is the
        backend's creation step (see :meth:`pgroups.backend.GroupBackend.build_for_rank_lists`).
        The CPU group is the device group on a CPU job, None on a device backend.
        """
        self._require()
        group = self.backend.build_for_rank_lists(name, rank_groups)
        mine = next((sorted(g) for g in rank_groups if self._rank in g), None)
        if mine is None or group is None:
            return None
        return GroupHandle(shown_as, group, None if self.backend.cpu_twin_needed else group, tuple(mine),
                           mine.index(self._rank), self.backend.device_for_tensors(), self.model_name, kind)

    # ---- ranks ------------------------------------------------------------------------------
    def get_global_rank(self) -> int:
        """This process's rank in the world."""
        self._require()
        return self._rank

    def topology_rank(self) -> int:
        """This rank in the topology's own numbering: the global rank for the job; for a model,
        its position among the model's ranks."""
        self._require()
        return self._rank

    def to_job_ranks(self, ranks: Sequence[int]) -> List[int]:
        """Ranks in the topology's numbering → global ranks (the identity for the job)."""
        return list(ranks)

    def get_local_rank(self, mode: ModeLike) -> int:
        """This rank's position in its sorted ``mode`` group."""
        state = self._member_state(mode)
        return state.ranks.index(self._rank)

    def get_group_rank(self, mode: ModeLike) -> int:
        """This rank's position in its sorted ``mode`` group — torch's name for it
        (``dist.get_group_rank``); :meth:`get_local_rank` is the InternEvo name, kept as an alias.
        Not ``LaunchInfo.local_rank``, which is the rank on the node."""
        return self.get_local_rank(mode)

    def get_world_size(self, mode: ModeLike) -> int:
        """The size of this rank's ``mode`` group."""
        return len(self._member_state(mode).ranks)

    def get_ranks_in_group(self, mode: ModeLike) -> List[int]:
        """The sorted global ranks of this rank's ``mode`` group."""
        return list(self._member_state(mode).ranks)

    def get_rank_groups(self, mode: ModeLike) -> RankGroups:
        """Every group of ``mode`` across the world (O(world); pure, no communication)."""
        state = self._state(mode)
        return [list(g) for g in state.initializer.rank_groups(self.topology)]

    def to_global_rank(self, mode: ModeLike, local_rank: int) -> int:
        """The global rank at ``local_rank`` in this rank's ``mode`` group."""
        ranks = self._member_state(mode).ranks
        if not 0 <= local_rank < len(ranks):
            raise ValueError(f"local rank {local_rank} is outside 0..{len(ranks) - 1} of mode {canonical_name(mode)!r}")
        return ranks[local_rank]

    def to_local_rank(self, mode: ModeLike, global_rank: int) -> int:
        """The position of ``global_rank`` in this rank's ``mode`` group (ValueError if absent)."""
        ranks = self._member_state(mode).ranks
        if global_rank not in ranks:
            raise ValueError(f"rank {global_rank} is not in this rank's {canonical_name(mode)!r} group {ranks}")
        return ranks.index(global_rank)

    def is_first_rank(self, mode: ModeLike) -> bool:
        return self.get_local_rank(mode) == 0

    def is_last_rank(self, mode: ModeLike) -> bool:
        return self.get_local_rank(mode) == self.get_world_size(mode) - 1

    def get_next_global_rank(self, mode: ModeLike = "pp") -> int:
        """The next rank in this rank's ``mode`` group, as a ring (pipeline: the next stage)."""
        ranks = self._member_state(mode).ranks
        return ranks[(ranks.index(self._rank) + 1) % len(ranks)]

    def get_prev_global_rank(self, mode: ModeLike = "pp") -> int:
        """The previous rank in this rank's ``mode`` group, as a ring."""
        ranks = self._member_state(mode).ranks
        return ranks[(ranks.index(self._rank) - 1) % len(ranks)]

    def is_pipeline_first_stage(self, chunk: Optional[int] = None) -> bool:
        """Whether this rank is the first pipeline stage (and, given ``chunk``, that chunk is 0:
        it holds the model's first layers)."""
        return virtual_pipeline.is_first_stage(self.get_local_rank("pp"),
                                               self.topology.pipeline, self.get_virtual_pipeline_size(), chunk)

    def is_pipeline_last_stage(self, chunk: Optional[int] = None) -> bool:
        """Whether this rank is the last pipeline stage (and, given ``chunk``, that chunk is the
        last one: it holds the model's last layers)."""
        return virtual_pipeline.is_last_stage(self.get_local_rank("pp"),
                                              self.topology.pipeline, self.get_virtual_pipeline_size(), chunk)

    # ---- virtual pipeline ---------------------------------------------------------------------
    def get_virtual_pipeline_size(self) -> int:
        """Model chunks per pipeline rank (``parallel.virtual_pipeline``; 1 without interleaving)."""
        self._require()
        return self.topology.virtual_pipeline or 1

    def get_virtual_pipeline_layers(self, num_layers: int, first_stage_layers: Optional[int] = None,
                                    last_stage_layers: Optional[int] = None) -> List[range]:
        """The layers of each of this rank's model chunks (index = chunk), by the rule of
        :mod:`pgroups.virtual_pipeline` (ConfigError when ``num_layers`` does not split)."""
        stage = self.get_local_rank("pp")
        return virtual_pipeline.layer_map(num_layers, self.topology.pipeline, self.get_virtual_pipeline_size(),
                                          first_stage_layers, last_stage_layers)[stage]

    # ---- exports ------------------------------------------------------------------------------
    def device_mesh(self, dims: Union[str, Sequence[str]], device_type: Optional[str] = None) -> Any:
        """A torch ``DeviceMesh`` over ``dims`` (axes such as ``("dp", "tp")``, combinations such
        as ``"tp-pp"``, or their aliases such as ``"tensor"``) whose dimension groups are this
        context's own groups; see :func:`pgroups.exports.device_mesh`."""
        self._require()
        return exports.device_mesh(self, dims, device_type)

    def megatron_groups(self, fields: Optional[Sequence[str]] = None) -> "exports.MegatronGroups":
        """This context's groups under Megatron-Core's ``ProcessGroupCollection`` field names;
        see :func:`pgroups.exports.megatron_groups`."""
        self._require()
        return exports.megatron_groups(self, fields)

    def megatron_groups_by_model(self, fields: Optional[Sequence[str]] = None) -> Dict[str, "exports.MegatronGroups"]:
        """Megatron-Core MIMO style: ``{model: its Megatron group collection}`` for every model of
        the config this rank belongs to, each built from the context's own communicators."""
        self._require()
        return {name: model.megatron_groups(fields) for name, model in self._models.items() if model.is_in_model()}

    def get_initializer(self, mode: ModeLike) -> ProcessGroupInitializer:
        """The initializer that says which ranks form ``mode``'s groups."""
        return self._state(mode).initializer

    def is_member(self, mode: ModeLike) -> bool:
        """Whether this rank is in one of ``mode``'s groups."""
        return self._state(mode).ranks is not None

    def find_mode(self, mode: ModeLike) -> str:
        """The built mode (its canonical name) that answers for ``mode``: itself under any
        spelling (``"tensor"`` is ``"tp"``), else a built mode with identical groups (``"tp-cp"``
        is ``"tp"`` when context is 1). ModeNotInitializedError naming it when none is built (list it under
        ``parallel.modes``)."""
        self._require()
        name = canonical_name(mode)
        try:
            return self._state(mode).mode
        except ModeNotInitializedError:
            pass
        key = self.topology.layout_key(name)  # UnknownModeError / ConfigError for a bad name
        for built, state in self._modes.items():
            init = state.initializer
            if (init.inner if isinstance(init, PlacedInitializer) else init).layout_key(self.topology) == key:
                return built
        raise ModeNotInitializedError(
            f"mode {name!r} was not built and no built mode has its groups; list it under "
            f"parallel.modes (built modes: {allowed(self._modes)})")

    def _require(self) -> None:
        if self.topology is None:
            raise ModeNotInitializedError("the parallel context is not initialized "
                                          "(call gpc.init_from_config(...) first)")

    def get_hostnames(self) -> List[str]:
        """Every rank's host name, indexed by global rank (collective over the world the first
        time, then cached). Hosts come from the ranks themselves, never from ``rank // 8``.

        Works with ``cpu_groups: off`` (the exchange then runs on the device world group). A
        peer that never calls it raises GroupTimeoutError after ``timeout_s``."""
        self._require()
        if self._hostnames is None:
            from .hosts import gather_hostnames

            off = self.config.cpu_groups == "off" and self.backend.cpu_twin_needed
            # With CPU groups off, the exchange runs on the device world group (the default group).
            group = self.backend.world_group() if off else self.get_cpu_group("global")
            device = self.backend.device_for_tensors() if off else None
            world = self.topology.world_size
            timeout_s = self.backend.timeout.total_seconds()
            self._hostnames = gather_hostnames(group, device=device, timeout=self.backend.timeout, describe=lambda exc: (
                f"gathering every rank's hostname over the world group (ranks {format_ranks(range(world))}) "
                f"timed out after {timeout_s:g}s on rank {self._rank}: a peer never entered "
                "(is every rank calling get_hostnames()? across hosts, set GLOO_SOCKET_IFNAME)"))
        return list(self._hostnames)

    def describe(self) -> str:
        """A readable summary: the layout, then one line per mode for this rank."""
        if self.topology is None:
            return "ParallelContext (not initialized)"
        lines = [f"rank {self._rank}: {self.topology.describe()}",
                 f"backend {self.backend.device_backend} (cpu twins {self.backend.cpu_backend}, "
                 f"strategy {self.backend.strategy}, {self.backend.calls} group-creation calls)"]
        for name, state in self._modes.items():
            if state.ranks is None:
                lines.append(f"  {name:<10} (no group on this rank)")
                continue
            shared = f", shares {state.shares_with!r}" if state.shares_with else ""
            built = "built" if state.built else "lazy"
            lines.append(f"  {name:<10} local {state.ranks.index(self._rank)}/{len(state.ranks)} "
                         f"ranks {format_ranks(state.ranks, limit=8)} ({built}{shared})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<ParallelContext {'uninitialized' if self.topology is None else self.topology.describe()}>"


def creation_store(device_backend: str, init_store: Any, rank: int) -> Any:
    """The store where members meet before creating a group (:class:`pgroups.backend.CreationRendezvous`),
    under a prefix no earlier context used: the init's own prefix when this context started
    torch.distributed, else a per-context generation on the default store (every rank counts its
    own contexts, so the counts agree). None under the fake backend (no peers to meet)."""
    if device_backend == "fake":
        return None
    if init_store is not None:
        return dist.PrefixStore("creation", init_store)
    store = torch_private.default_store()  # the user started torch.distributed
    generation = store.add(f"pgroups/contexts/rank{rank}", 1)
    return dist.PrefixStore(f"pgroups/context{generation}/creation", store)


def _check_launch_matches(launch: LaunchInfo, rank: int, world_size: int) -> None:
    if (launch.rank, launch.world_size) != (rank, world_size):
        raise LaunchError(
            f"init_from_config(launch=...) says rank {launch.rank} of {launch.world_size}, but "
            f"torch.distributed is already running as rank {rank} of {world_size}; pass no launch "
            "(the running job is used) or call torch.distributed.destroy_process_group() first")
    warnings.warn(f"torch.distributed is already initialized (rank {rank} of {world_size}): "
                  f"launch={launch!r} is not used to start it", stacklevel=3)


def own_group(init: ProcessGroupInitializer, topology: Topology, rank: int) -> Optional[List[int]]:
    """``rank``'s group of ``init``'s mode; a user initializer's answer is checked (ConfigError)."""
    if isinstance(init, (BuiltinInitializer, PlacedInitializer)):  # placed: checks its inner one
        return init.group_of(topology, rank)
    group = checked_initializer_call(init, f"finding rank {rank}'s group", lambda: init.group_of(topology, rank))
    return check_group_of(group, rank, topology.world_size, describe_initializer(init))
