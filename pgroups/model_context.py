"""One model of a several-model config, as a context: :class:`ModelContext` (its layout on its
ranks, queried like the job's context, in global ranks). :func:`plan_models`, which validates
every model before any communication, is in :mod:`pgroups.mode_plan` (pure; imported here too);
the placement math in :mod:`pgroups.models`."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from .context import ModeState, ParallelContext
from .errors import ModeNotInitializedError
from .mode_plan import plan_models  # noqa: F401  (imported from here too)
from .modes import ModeLike, canonical_name
from .ranks import format_ranks
from .topology import Topology


class ModelContext(ParallelContext):
    """One model of a several-model config: its layout on its ranks, queried like the job's
    context (``gpc.model("rollout").get_group("tp")``), in global ranks. Shares the job's
    backend; its ``topology`` numbers the model's ranks 0..n-1. A rank outside the model gets
    ModeNotInitializedError naming the model and its ranks."""

    def __init__(self, job: ParallelContext, name: str, ranks: Tuple[int, ...], topology: Topology) -> None:
        super().__init__(job.registry)
        self.job, self.model_name, self.ranks = job, name, tuple(ranks)
        self.config, self.topology, self.backend = job.config, topology, job.backend
        self.launch, self._rank = job.launch, job._rank

    def is_in_model(self) -> bool:
        """Whether this rank is one of the model's ranks."""
        return self._rank in self.ranks

    def _takes_part(self) -> bool:
        return self.is_in_model() or self.backend.strategy != "local"

    def _state(self, mode: ModeLike) -> ModeState:
        if not self.is_in_model() and self.topology is not None:
            raise ModeNotInitializedError(
                f"rank {self._rank} is not in model {self.model_name!r} (ranks {format_ranks(self.ranks, limit=8)}): "
                f"it has no {canonical_name(mode)!r} group of that model")
        return super()._state(mode)

    def topology_rank(self) -> int:
        if not self.is_in_model():
            raise ModeNotInitializedError(f"rank {self._rank} is not in model {self.model_name!r} "
                                          f"(ranks {format_ranks(self.ranks, limit=8)})")
        return self.ranks.index(self._rank)

    def to_job_ranks(self, ranks: Sequence[int]) -> List[int]:
        return [self.ranks[r] for r in ranks]

    def release(self) -> List[str]:
        """Destroy the communicators only this model uses (a communicator another model or the
        job shares stays); return the modes released. A later query re-creates a mode at the
        usual per-rank cost — by its members alone under members-only creation; where creation
        is collective over the world, every rank calls :meth:`rebuild` first. Collective over
        nobody: each rank releases its own handles (call it on every rank of the model)."""
        if not self._takes_part():
            return []
        kept = {id(g) for ctx in [self.job, *self.job._models.values()] if ctx is not self
                for st in ctx._modes.values() for g in (st.group, st.cpu_group) if g is not None}
        kept.add(id(self.backend.world_group()))
        released = []
        for state in self._modes.values():
            for group in {id(g): g for g in (state.group, state.cpu_group) if g is not None}.values():
                if id(group) not in kept:
                    self.backend.destroy_group(group)
            if state.built or state.cpu_built:
                released.append(state.mode)
            state.group = state.cpu_group = None
            state.built = state.cpu_built = False
            state.released = True
        return released

    def rebuild(self) -> None:
        """Re-create the groups the config builds at init (collective like init: every rank of the
        world where creation is world-collective, else the model's ranks)."""
        for state in self._modes.values():
            state.released = False
        self._build_eager()

    def destroy(self) -> None:
        raise RuntimeError(f"model {self.model_name!r} is destroyed with its job: call gpc.destroy()")

    def __repr__(self) -> str:
        return f"<ModelContext {self.model_name!r} ranks {format_ranks(self.ranks, limit=8)}: {self.topology.describe()}>"
