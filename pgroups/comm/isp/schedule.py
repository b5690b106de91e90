"""The ISP gather / release / reduce-scatter decisions as a pure state machine (no torch).

The runtime (:mod:`.runtime`) tells :class:`IspSchedule` what happens — a block's forward or
backward begins or ends, a linear records a forward or finishes its backward, a gradient
reduce-scatter is about to start — and applies the :class:`Action` list each call returns, in
order: ``release`` a block's full weights, ``gather`` a block's full weights (start the
all-gathers), ``complete`` a parameter's reduce-scatter (wait and accumulate).

Words. Blocks ``0 .. N-1`` are split into *segments* of consecutive blocks (one per model
chunk; one segment without virtual pipeline stages). A *pass* runs the blocks of one segment
for one micro-batch: a forward in ascending order, a backward in descending order. A block is
*running* from its ``forward_begin`` to its ``forward_end`` (forward) and from its
``backward_begin`` to the backward of the last linear that recorded in the forward being
differentiated (a backward). Each recording forward of a block gets a *token*; the linears that
record in it count against it, and each of their backwards counts down; the block's backward
for that micro-batch ends when its token reaches zero — per forward, per micro-batch, so a
block's weights are released after *its own* backward even when other micro-batches' forwards
of the block still wait for theirs.

The rule (InternEvo's, per block). A block's full weights are gathered when it begins (unless
already live) and released when it ends; nothing is kept between a block's forward and its
backward (the backward gathers again). The *window* holds the blocks gathered ahead: when a
block begins, the window becomes the next ``depth`` blocks of its segment in the direction of
its pass; when the last block (of the last segment) ends a recording forward (``lookahead``, for a plain
``loss.backward()`` loop) the window becomes that one block, the first of the backward to come,
and its weights stay (not released and gathered again: one all-gather saved per pass); on
:meth:`IspSchedule.expect_backward` (a pipeline scheduler's ``before_backward``) the window
becomes the announced block, gathered then.
Every change of window first releases the blocks it drops that are not running. Releases come
before gathers in every action list.

The bound. Call a schedule *sequential* when each begun block ends before another block begins
(a recomputation of the running block inside its own backward excepted): the order of a
sequential program, and of autograd's engine on a chain of blocks. Then at every moment

    live ⊆ running ∪ window,   |running| ≤ 1,   |window| ≤ depth,

so at most ``1 + depth`` blocks' full weights are live — during every forward and backward of
every micro-batch, whatever the interleaving of micro-batches and segments (1F1B, interleaved
virtual stages, two forwards then two backwards). Between a block's end and the next begin at
most ``depth`` are live (the window); at the switch from the last block's forward to its
backward exactly 1 (the lookahead) until the backward begins with it and adds up to ``depth``
blocks before it. A lookahead that the next begin does not use (another forward came first) is
released at that begin, never kept beside the new pass. With ``overlap=False`` the window
is always empty: at most 1 block is live. Blocks gathered on demand (:meth:`IspSchedule.need`,
a linear run outside its block's hooks) join the window and leave it at the next change; the
bound is stated for blocks run through their hooks.

Reduce-scatters. At most one is in flight per parameter (a second one for the same parameter,
gradient accumulation, completes the first); when a block's backward begins, the reduce-scatters
started more than ``depth`` block backwards ago are completed, so those of at most ``1 + depth``
block backwards are in flight; :meth:`IspSchedule.wait_reduces` completes them all. Every
started reduce-scatter is completed exactly once.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Hashable, List, Optional, Sequence, Tuple

import attrs

__all__ = ["Action", "IspSchedule", "prefetch_blocks"]

GATHER, RELEASE, COMPLETE = "gather", "release", "complete"


@attrs.frozen
class Action:
    """``kind`` ``"gather"`` / ``"release"`` (``target``: a block index) or ``"complete"``
    (``target``: the key a reduce-scatter was started under)."""

    kind: str
    target: Hashable


def prefetch_blocks(index: int, depth: int, num_blocks: int, forward: bool) -> Tuple[int, ...]:
    """The blocks to start gathering when block ``index`` starts: the next ``depth`` blocks in
    the direction of the pass (forward: ``index + 1 ..``, backward: ``index - 1 ..``), within
    ``0 .. num_blocks - 1``."""
    step = 1 if forward else -1
    candidates = (index + step * k for k in range(1, depth + 1))
    return tuple(j for j in candidates if 0 <= j < num_blocks)


class IspSchedule:
    """The state machine of the module docstring.

    ``segment_sizes``: blocks per segment (model chunk), in block order (``[N]`` for one).
    ``depth``: blocks gathered ahead (≥ 1; ignored without ``overlap``). ``lookahead``: keep the
    last block after its recording forward for the backward (False when a scheduler announces
    backwards with :meth:`expect_backward`). Raises ValueError for empty segments or a bad depth.
    """

    def __init__(self, segment_sizes: Sequence[int], depth: int = 1, *, overlap: bool = True,
                 lookahead: bool = True) -> None:
        if not segment_sizes or any(int(s) < 1 for s in segment_sizes):
            raise ValueError(f"segment sizes must be positive and at least one, got {list(segment_sizes)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an integer >= 1 (blocks gathered ahead), got {depth!r}")
        self.depth = depth if overlap else 0
        self.lookahead = lookahead and overlap
        self._segment: List[Tuple[int, int]] = []      # block -> (first block, end) of its segment
        start = 0
        for size in segment_sizes:
            self._segment.extend([(start, start + int(size))] * int(size))
            start += int(size)
        self.num_blocks = start
        self._live: set = set()
        self._window: set = set()
        self._forward_running: Dict[int, int] = {}      # block -> nesting count of begun forwards
        self._forward_token: Dict[int, Optional[int]] = {}  # block -> token of its recording forward
        self._backward_running: set = set()
        self._pending: Dict[int, List[int]] = {}        # token -> [block, linears still to differentiate]
        self._next_token = 0
        self._reducing: Dict[Hashable, int] = {}        # key -> block-backward serial it started in
        self._backward_serial = 0
        self.gathers = 0                                # counters, for tests and benchmarks
        self.peak_live = 0

    # ---- queries ------------------------------------------------------------------------
    @property
    def live(self) -> FrozenSet[int]:
        """Blocks whose full weights are gathered (in flight or landed) now."""
        return frozenset(self._live)

    @property
    def running(self) -> FrozenSet[int]:
        """Blocks whose forward or backward has begun and not ended."""
        return frozenset(self._forward_running) | frozenset(self._backward_running)

    @property
    def window(self) -> FrozenSet[int]:
        return frozenset(self._window)

    def pending_tokens(self) -> Dict[int, Tuple[int, int]]:
        """``token -> (block, linears whose backward is still to come)``."""
        return {token: (block, count) for token, (block, count) in self._pending.items()}

    def reducing(self) -> FrozenSet[Hashable]:
        """Keys of the reduce-scatters in flight."""
        return frozenset(self._reducing)

    def ahead(self, block: int, forward: bool) -> Tuple[int, ...]:
        """The window when ``block`` begins: the next ``depth`` blocks of its segment in the
        direction of the pass."""
        first, end = self._segment[block]
        return tuple(first + j for j in prefetch_blocks(block - first, self.depth, end - first, forward))

    # ---- events -------------------------------------------------------------------------
    def forward_begin(self, block: int, recording: bool, recompute: bool = False) -> List[Action]:
        """Block ``block``'s forward begins. ``recording``: autograd records it (a token is
        opened for its linears); ``recompute``: activation recomputation inside the block's
        own backward (uses the weights, changes no window, records nothing)."""
        self._check(block)
        if recompute:
            return self.need(block)
        self._forward_running[block] = self._forward_running.get(block, 0) + 1
        if recording and self._forward_token.get(block) is None:
            self._forward_token[block] = self._open_token(block)
        return self._set_window(block, self.ahead(block, forward=True))

    def forward_end(self, block: int, recording: bool, recompute: bool = False) -> List[Action]:
        """Block ``block``'s forward ends: its weights are released (a recomputation keeps
        them for the backward running now). After the last block, a recording forward
        with ``lookahead`` keeps that block for the backward to come (the window)."""
        self._check(block)
        if recompute:
            return []
        count = self._forward_running.get(block, 0) - 1
        if count > 0:
            self._forward_running[block] = count
            return []
        self._forward_running.pop(block, None)
        token = self._forward_token.pop(block, None)
        recorded = token is not None and self._pending[token][1] > 0
        if token is not None and not recorded:
            del self._pending[token]  # nothing of this forward will be differentiated
        if recording and recorded and self.lookahead and block == self.num_blocks - 1:
            return self._set_window(None, (block,))  # kept, not released: the backward starts here
        return self._release_if_idle(block)

    def record_linear(self, block: int) -> Optional[int]:
        """A linear of ``block`` records a forward; returns the token its backward must pass to
        :meth:`linear_backward_done`. Outside a recording forward of the block (hooks removed)
        it opens a token of its own."""
        self._check(block)
        token = self._forward_token.get(block)
        if token is None:
            token = self._open_token(block)
        self._pending[token][1] += 1
        return token

    def backward_begin(self, block: int) -> List[Action]:
        """The gradient reaches block ``block``'s outputs: gather it (unless live), make the
        window the blocks before it, and complete the reduce-scatters of block backwards more
        than ``depth`` ago. A block with no forward awaiting backward does nothing."""
        self._check(block)
        if not any(b == block and count > 0 for b, count in self._pending.values()):
            return []
        self._backward_serial += 1
        self._backward_running.add(block)
        completes = [Action(COMPLETE, key) for key, serial in list(self._reducing.items())
                     if serial <= self._backward_serial - 1 - self.depth]
        for action in completes:
            del self._reducing[action.target]
        actions = self._set_window(block, self.ahead(block, forward=False))
        releases = [a for a in actions if a.kind == RELEASE]
        return releases + completes + actions[len(releases):]

    def linear_backward_done(self, token: int) -> List[Action]:
        """A linear's backward has run (its weight gradient is handed to a reduce-scatter).
        When the last linear of the token's forward has, that block's backward for that
        micro-batch ends and its weights are released."""
        entry = self._pending.get(token)
        if entry is None:
            raise ValueError(f"token {token} has no linear waiting for backward (a backward ran twice?)")
        entry[1] -= 1
        if entry[1] > 0:
            return []
        block = entry[0]
        del self._pending[token]
        self._backward_running.discard(block)
        return self._release_if_idle(block)

    def expect_backward(self, block: int) -> List[Action]:
        """A scheduler announces that a backward pass starting at ``block`` comes next: the
        window becomes that block (gathered now)."""
        self._check(block)
        return self._set_window(None, (block,) if self.depth else ())

    def need(self, block: int) -> List[Action]:
        """A linear of ``block`` needs its full weights now: gather them if they are not live
        (on demand: they join the window and leave it at its next change)."""
        self._check(block)
        if block in self._live:
            return []
        if block not in self.running:
            self._window.add(block)
        return [self._gather(block)]

    def before_reduce(self, key: Hashable) -> List[Action]:
        """A reduce-scatter is about to start under ``key`` (a parameter): complete the one in
        flight under the same key first (its gradient accumulates before the next)."""
        actions = [Action(COMPLETE, key)] if key in self._reducing else []
        self._reducing[key] = self._backward_serial
        return actions

    def wait_reduces(self) -> List[Action]:
        """Complete every reduce-scatter in flight (a micro-batch's end, or the step's)."""
        actions = [Action(COMPLETE, key) for key in self._reducing]
        self._reducing.clear()
        return actions

    def finish(self) -> List[Action]:
        """The step ends (every backward has run): complete every reduce-scatter, release
        every live block, forget forwards never differentiated."""
        actions = self.wait_reduces() + [Action(RELEASE, block) for block in sorted(self._live)]
        self._live.clear()
        self._window.clear()
        self._forward_running.clear()
        self._forward_token.clear()
        self._backward_running.clear()
        self._pending.clear()
        return actions

    # ---- internals ----------------------------------------------------------------------
    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} is not one of the {self.num_blocks} blocks")

    def _open_token(self, block: int) -> int:
        token = self._next_token
        self._next_token += 1
        self._pending[token] = [block, 0]
        return token

    def _gather(self, block: int) -> Action:
        self._live.add(block)
        self.gathers += 1
        self.peak_live = max(self.peak_live, len(self._live))
        return Action(GATHER, block)

    def _release_if_idle(self, block: int) -> List[Action]:
        if block in self._live and block not in self.running and block not in self._window:
            self._live.discard(block)
            return [Action(RELEASE, block)]
        return []

    def _set_window(self, begun: Optional[int], window: Sequence[int]) -> List[Action]:
        """Replace the window by ``window``; ``begun`` (a block that begins now) must be live."""
        dropped = self._window - set(window)
        self._window = set(window) - ({begun} if begun is not None else set())
        actions: List[Action] = []
        for block in sorted(dropped):
            actions += self._release_if_idle(block)
        wanted = ([begun] if begun is not None else []) + list(window)
        actions += [self._gather(block) for block in wanted if block not in self._live]
        return actions
