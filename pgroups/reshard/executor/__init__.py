"""Run a :class:`~pgroups.reshard.planner.Plan` on torch.distributed.

Transport: point-to-point (``dist.batch_isend_irecv``) on the context's *global* group. Point to
point needs no extra process group, so layouts on any subset of ranks (disjoint, overlapping)
work without creating groups on only some ranks; broadcasts over cached groups were measured
against it (bench/bench_reshard.py) and bring nothing: after the planner spreads senders over
replicas, nearly every message has exactly one receiver.

**Plan agreement.** Before any byte moves, the ranks of the group all-gather an 8-byte digest of
the plan and of the options both ends of a message must share (``bucket_bytes``, ``dst_dtypes``,
``verify``): a mismatch raises ReshardError on every rank, naming the first rank that disagrees
with the majority, and nothing is sent or written. A rank whose own tensors fail the checks
contributes a refusal, so its peers fail at once instead of timing out. The agreement is a
collective over the group: every rank of it runs the plan (ranks outside the plan with empty
mappings).

**Wire format** (:mod:`.wire`, pure: both ends derive it from the plan alone). Per step each rank
sends to at most one peer and receives from at most one; the bytes a pair exchanges in a step form
one message of pieces in the *destination* dtype, cut into chunks of at most ``bucket_bytes``
(small pieces packed together, large contiguous ones sent straight from the source tensor).

**Posting.** Each rank cuts its *rounds* (:func:`.wire.rounds`: chunk i of the message it
receives and of the one it sends in a step, in (step, i) order — the same order on every rank)
into *batches* (:func:`.wire.batches`) and posts each batch as one ``batch_isend_irecv`` — under
NCCL one group, whose operations with different peers move at once, as in NCCL's all-to-all. By
default a rank's whole sync is one batch: every peer's messages move together, so each NIC
stays busy until its own bytes are done (the simulated makespan of the RLHF-shaped pairs is the
NIC lower bound, ``pgroups.reshard.plan``). With ``max_staging_bytes`` a batch buffers only what
the budget allows and the next batch is packed while the previous one is on the wire (two
buffer regions); a progress callback cuts the batches at steps. Any cut is deadlock-free (the
globally first unfinished round has both of its ends' batches started). Copies only where
needed: a contiguous, unconverted transfer is sent straight from the source tensor; packing —
copy, cast, quantize — goes into a region's send buffer. Two receive modes:

- ``atomic=True`` (default): every received byte lands in a staging buffer; destination tensors
  are written only after every step (and, with ``verify=True``, every checksum) succeeded on this
  rank — one copy, staging to destination: a failure — a dead peer, a timeout (``timeout_s``
  without progress), a checksum mismatch — raises naming the step and the peer ranks and leaves
  the destination untouched. Staging holds all the bytes the rank receives.
- ``atomic=False`` (streaming): a contiguous, unconverted chunk is received straight into the
  destination tensor (no copy at all); the others go to a region's receive buffer and are
  unpacked once their batch completed, within ``max_staging_bytes``. On a failure the
  destination may be partly written (the error says so), and a receive still posted then may
  write it later: retry on a fresh group.

``ReshardStats.bytes_packed`` / ``bytes_unpacked`` count the wire bytes that went through a
buffer on each side.

After a failed run the buffers that posted receives may still target are dropped (kept alive
while those operations have not completed, never reused; nothing is kept when nothing was in
flight): a retry allocates fresh ones, so a late message from the failed attempt cannot scribble
on it. Every wait goes through :func:`pgroups.deadlines.wait_within` at ``timeout_s``. (gloo also closes the connection of a timed-out operation:
retry on a fresh group — set ``Resharder.group`` — or after re-initialising; NCCL's watchdog
aborts the communicator unless told otherwise.)

Every rank of the group must run the same plan with the same options (:func:`execute_plan` once,
or :class:`Resharder` for repeated syncs: plan layout, buffers and communicators are reused, and
the second and later runs allocate nothing).
"""
from ...errors import ReshardError
from ..wire import DEFAULT_BUCKET_BYTES
from .buffers import _Buffers  # noqa: F401  (the executor's parts, for tests and benchmarks)
from .checksum import _checksum  # noqa: F401
from .resharder import ReshardStats, Resharder, execute_plan, reshard
from .transfer import _Run  # noqa: F401

__all__ = ["DEFAULT_BUCKET_BYTES", "ReshardError", "ReshardStats", "Resharder", "execute_plan", "reshard"]
