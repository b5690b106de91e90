"""The ISP gather / release / reduce-scatter schedule, alone (no processes): golden traces and a
property over random micro-batch schedules — 1F1B warm-up, interleaved virtual stages (segments),
random valid orders of each micro-batch's passes, activation recomputation, no-grad forwards.

The oracle re-derives InternEvo's rule from the trace, not from the schedule: a block may hold
full weights while it runs (its forward, or its backward until its last linear's backward), and
the ``d`` blocks after the most recently begun block, in its pass's direction within its
segment, may hold prefetched ones; after the last block's recording forward (plain loop) or an
announced backward (scheduler), that one block may be held until the next begin. Everything else
must have been released. So live ⊆ allowed and |live| ≤ 1 + d at every action.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgroups.comm.isp.schedule import Action, IspSchedule, prefetch_blocks


# ---- a driver that plays traces and checks the oracle at every action -----------------------
class Player:
    """Plays passes ``("F", micro, segment)`` / ``("B", micro, segment)`` / ``("N", micro,
    segment)`` (a no-grad forward) against a schedule, applying its actions to its own live set
    and checking, after every action, the oracle of the module docstring."""

    def __init__(self, schedule: IspSchedule, segments: List[int], linears: List[int], *,
                 scheduler: bool = False, recompute: bool = False) -> None:
        self.s, self.linears, self.scheduler, self.recompute = schedule, linears, scheduler, recompute
        self.depth = schedule.depth
        self.bounds: List[Tuple[int, int]] = []
        start = 0
        for size in segments:
            self.bounds.append((start, start + size))
            start += size
        self.live: Set[int] = set()
        self.gathers = 0
        self.tokens: Dict[Tuple[int, int], List[int]] = {}     # (micro, block) -> tokens of its linears
        self.allowed_running: Set[int] = set()
        self.allowed_ahead: Set[int] = set()
        self.reducing: Dict[tuple, int] = {}                   # key -> block backward it started in
        self.reduces_started = 0
        self.reduces_completed: List[tuple] = []
        self.backward_count = 0
        self.max_live = 0

    # the oracle's window: the next d blocks of the segment in the pass's direction
    def ahead(self, block: int, forward: bool) -> Set[int]:
        first, end = next(b for b in self.bounds if b[0] <= block < b[1])
        step = 1 if forward else -1
        return {block + step * k for k in range(1, self.depth + 1) if first <= block + step * k < end}

    def apply(self, actions: List[Action]) -> None:
        for action in actions:
            if action.kind == "gather":
                assert action.target not in self.live, f"gathered block {action.target} twice"
                self.live.add(action.target)
                self.gathers += 1
            elif action.kind == "release":
                assert action.target in self.live, f"released block {action.target} that is not live"
                self.live.discard(action.target)
            else:
                assert action.target in self.reducing, f"completed {action.target} not in flight"
                del self.reducing[action.target]
                self.reduces_completed.append(action.target)
            self.check()
        assert self.live == set(self.s.live), "the schedule's own live set disagrees with its actions"

    def check(self) -> None:
        allowed = self.allowed_running | self.allowed_ahead
        assert self.live <= allowed, f"live {sorted(self.live)} outside allowed {sorted(allowed)}"
        assert len(self.live) <= 1 + self.depth, f"{len(self.live)} blocks live > 1 + {self.depth}"
        self.max_live = max(self.max_live, len(self.live))
        instances = set(self.reducing.values())
        assert len(instances) <= 1 + self.depth, f"reduces of {len(instances)} block backwards in flight"

    def begin(self, block: int, forward: bool) -> None:
        self.allowed_running = {block}
        self.allowed_ahead = self.ahead(block, forward)

    def play(self, passes) -> None:
        for kind, micro, segment in passes:
            first, end = self.bounds[segment]
            if kind in "FN":
                for block in range(first, end):
                    self.forward_block(micro, block, recording=kind == "F")
            else:
                if self.scheduler:
                    self.allowed_ahead = {end - 1} if self.depth else set()
                    self.apply(self.s.expect_backward(end - 1))
                for block in reversed(range(first, end)):
                    self.backward_block(micro, block)
            if self.scheduler:
                self.apply(self.s.wait_reduces())  # the scheduler hook's after_backward

    def forward_block(self, micro: int, block: int, recording: bool) -> None:
        self.begin(block, forward=True)
        self.apply(self.s.forward_begin(block, recording))
        assert block in self.live, f"forward of block {block} without its weights"
        if recording:
            self.tokens[(micro, block)] = [self.s.record_linear(block) for _ in range(self.linears[block])]
        last = block == self.bounds[-1][1] - 1
        self.allowed_running = set()
        if recording and last and self.s.lookahead:  # kept for the backward that may follow
            self.allowed_ahead = {block}
        self.apply(self.s.forward_end(block, recording))
        self.check()

    def backward_block(self, micro: int, block: int) -> None:
        self.begin(block, forward=False)
        self.backward_count += 1
        self.apply(self.s.backward_begin(block))
        assert block in self.live, f"backward of block {block} without its weights"
        if self.recompute:
            self.apply(self.s.forward_begin(block, recording=False, recompute=True))
            self.apply(self.s.forward_end(block, recording=False, recompute=True))
        tokens = self.tokens.pop((micro, block))
        for index, token in enumerate(tokens):
            assert block in self.live, f"linear backward of block {block} without its weights"
            key = (block, index)
            self.apply(self.s.before_reduce(key))
            assert key not in self.reducing, f"reduce of {key} started while one is in flight"
            self.reducing[key] = self.backward_count
            self.reduces_started += 1
            if index == len(tokens) - 1:
                self.allowed_running = set()
            self.apply(self.s.linear_backward_done(token))

    def finish(self) -> None:
        self.allowed_running, self.allowed_ahead = set(), set()
        self.apply(self.s.finish())
        assert not self.live and not self.s.live
        assert not self.reducing
        assert len(self.reduces_completed) == self.reduces_started, "a reduce-scatter completed twice or never"


# ---- golden traces ---------------------------------------------------------------------------
def play(passes, segments=(5,), depth=1, linears=2, **kwargs) -> Player:
    schedule = IspSchedule(list(segments), depth, overlap=kwargs.pop("overlap", True),
                           lookahead=not kwargs.get("scheduler", False))
    player = Player(schedule, list(segments), [linears] * sum(segments), **kwargs)
    player.play(passes)
    return player


def test_two_forwards_then_one_backward_keep_one_plus_depth_live():
    """1F1B warm-up (F F B). Counting recorded forwards per block, not per forward, kept all 5
    blocks during the first backward; each block's backward now releases it."""
    for depth in (1, 2):
        player = play([("F", 0, 0), ("F", 1, 0), ("B", 0, 0)], depth=depth)
        assert player.max_live == 1 + depth
        assert player.live == set()                    # block 0's backward released it
        assert len(player.s.pending_tokens()) == 5     # micro-batch 1's forwards still wait


def test_two_forwards_then_two_backwards_gather_twice_per_block_and_release_everything():
    player = play([("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("B", 1, 0)], depth=1)
    # micro-batch 0's lookahead is dropped by micro-batch 1's forward; micro-batch 1's is used
    assert player.gathers == 2 * 5 * 2 - 1
    assert player.max_live == 2
    player.finish()


def test_plain_loop_gathers_each_block_twice_less_the_kept_last_block():
    player = play([("F", 0, 0), ("B", 0, 0)], depth=1)
    assert player.gathers == 2 * 5 - 1 and player.s.gathers == player.gathers
    player = play([("F", 0, 0), ("B", 0, 0)], depth=1, scheduler=True)
    assert player.gathers == 2 * 5   # the scheduler's before_backward gathers it again


def test_without_overlap_one_block_is_live():
    player = play([("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("B", 1, 0)], overlap=False)
    assert player.max_live == 1
    player.finish()


def test_golden_actions_of_a_three_block_step():
    s = IspSchedule([3], 1)
    assert s.forward_begin(0, True) == [Action("gather", 0), Action("gather", 1)]
    t0 = s.record_linear(0)
    assert s.forward_end(0, True) == [Action("release", 0)]
    assert s.forward_begin(1, True) == [Action("gather", 2)]
    t1 = s.record_linear(1)
    assert s.forward_end(1, True) == [Action("release", 1)]
    assert s.forward_begin(2, True) == []
    t2 = s.record_linear(2)
    assert s.forward_end(2, True) == []                       # kept for the backward
    assert s.live == {2}                                      # at the switch: exactly 1 block
    assert s.backward_begin(2) == [Action("gather", 1)]
    assert s.before_reduce("w2") == []
    assert s.linear_backward_done(t2) == [Action("release", 2)]
    assert s.backward_begin(1) == [Action("gather", 0)]
    assert s.before_reduce("w1") == []
    assert s.linear_backward_done(t1) == [Action("release", 1)]
    assert s.backward_begin(0) == [Action("complete", "w2")]  # more than depth 1 backwards ago
    assert s.linear_backward_done(t0) == [Action("release", 0)]
    assert s.finish() == [Action("complete", "w1")]
    with pytest.raises(ValueError, match="token 0 has no linear waiting"):
        s.linear_backward_done(t0)


def test_a_second_reduce_of_a_parameter_completes_the_first():
    s = IspSchedule([2], 1)
    assert s.before_reduce("w") == []
    assert s.before_reduce("w") == [Action("complete", "w")]
    assert s.wait_reduces() == [Action("complete", "w")] and s.wait_reduces() == []


def test_on_demand_gather_joins_the_window_and_leaves_it_at_the_next_begin():
    s = IspSchedule([3], 1)
    assert s.need(2) == [Action("gather", 2)] and s.need(2) == []
    assert s.forward_begin(0, False) == [Action("release", 2), Action("gather", 0), Action("gather", 1)]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="prefetch depth must be an integer >= 1"):
        IspSchedule([3], 0)
    with pytest.raises(ValueError, match="segment sizes must be positive"):
        IspSchedule([3, 0], 1)
    with pytest.raises(ValueError, match="block 3 is not one of the 3 blocks"):
        IspSchedule([3], 1).forward_begin(3, True)


def test_prefetch_blocks_look_ahead_in_the_direction_of_the_pass():
    assert prefetch_blocks(0, 1, 4, forward=True) == (1,)
    assert prefetch_blocks(3, 2, 4, forward=False) == (2, 1)
    assert prefetch_blocks(0, 3, 4, forward=False) == ()
    assert IspSchedule([2, 3], 2).ahead(1, forward=True) == ()       # never across a segment
    assert IspSchedule([2, 3], 2).ahead(2, forward=True) == (3, 4)


class _PerBlockRelease(IspSchedule):
    """The old rule: release a block only when no forward of it, of any micro-batch, still
    waits for its backward."""

    def linear_backward_done(self, token: int) -> List[Action]:
        block = self._pending[token][0]
        self._pending[token][1] -= 1
        if any(b == block and count > 0 for b, count in self._pending.values()):
            return []
        self._pending = {t: e for t, e in self._pending.items() if e[0] != block or e[1] > 0}
        self._backward_running.discard(block)
        return self._release_if_idle(block)


def test_the_oracle_catches_the_old_per_block_rule():
    """The checker has teeth: the old bookkeeping fails it on F F B."""
    player = Player(_PerBlockRelease([5], 1), [5], [2] * 5)
    with pytest.raises(AssertionError, match="outside allowed"):
        player.play([("F", 0, 0), ("F", 1, 0), ("B", 0, 0)])


# ---- the property ------------------------------------------------------------------------------
def one_f_one_b(micro: int, warmup: int) -> List[tuple]:
    """A 1F1B stage's order: ``warmup`` forwards, then alternating F / B, then the cool-down."""
    order = [("F", m, 0) for m in range(min(warmup, micro))]
    nxt_f, nxt_b = len(order), 0
    while nxt_b < micro:
        if nxt_f < micro:
            order.append(("F", nxt_f, 0))
            nxt_f += 1
        order.append(("B", nxt_b, 0))
        nxt_b += 1
    return order


@st.composite
def traces(draw):
    segments = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    micro = draw(st.integers(1, 4))
    done = {m: [0, len(segments)] for m in range(micro)}  # next forward segment, next backward segment + 1
    order = []
    while True:
        ready = [("F", m, f) for m, (f, _) in done.items() if f < len(segments)]
        ready += [("B", m, b - 1) for m, (f, b) in done.items() if f == len(segments) and b > 0]
        if not ready:
            break
        kind, m, seg = draw(st.sampled_from(ready))
        order.append((kind, m, seg))
        done[m][0 if kind == "F" else 1] += 1 if kind == "F" else -1
        if draw(st.integers(0, 5)) == 0:              # now and then a no-grad forward (evaluation)
            order.append(("N", micro, draw(st.integers(0, len(segments) - 1))))
    linears = draw(st.lists(st.integers(1, 3), min_size=sum(segments), max_size=sum(segments)))
    return segments, order, linears


@settings(max_examples=400, deadline=None)
@given(trace=traces(), depth=st.integers(1, 3), overlap=st.booleans(), scheduler=st.booleans(),
       recompute=st.booleans())
def test_bound_holds_for_any_interleaving_of_micro_batches_and_segments(trace, depth, overlap, scheduler, recompute):
    """At every action: live ⊆ InternEvo's allowed set and |live| ≤ 1 + d (1 without overlap);
    every block has its weights when it runs; reduce-scatters of at most 1 + d block backwards
    in flight, each completed exactly once; finish releases everything. Gathers: at most one per
    block run (nothing gathered in vain), and only a pass's first block may find its weights
    left by the pass before (the lookahead, or the window's last block)."""
    segments, order, linears = trace
    schedule = IspSchedule(segments, depth, overlap=overlap, lookahead=not scheduler)
    player = Player(schedule, segments, linears, scheduler=scheduler, recompute=recompute)
    player.play(order)
    player.finish()
    runs = sum(end - start for kind, _, seg in order for start, end in [player.bounds[seg]])
    assert runs - (len(order) - 1) <= player.gathers <= runs


@pytest.mark.parametrize("micro,warmup", [(4, 1), (4, 2), (4, 3), (6, 4), (2, 2)])
@pytest.mark.parametrize("depth", [1, 2])
def test_1f1b_stages_keep_one_plus_depth(micro, warmup, depth):
    for scheduler in (False, True):
        player = play(one_f_one_b(micro, warmup), segments=(4,), depth=depth, scheduler=scheduler)
        assert player.max_live == 1 + depth
        player.finish()
