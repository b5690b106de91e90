"""Virtual (interleaved) pipeline: which layers each model chunk of each pipeline rank holds.

Pure rank math, no torch. With ``pipeline`` stages and ``virtual`` chunks per stage the model
is cut into ``pipeline * virtual`` consecutive *model chunks*; Megatron-Core's interleaved
schedule gives chunk ``c`` of pipeline rank ``p`` the model chunk of index ``c * pipeline + p``
(rank 0 holds model chunks 0, P, 2P, …). So with 16 layers, pipeline 4, virtual 2::

    rank 0: chunk 0 → layers 0-1,  chunk 1 → layers 8-9
    rank 1: chunk 0 → layers 2-3,  chunk 1 → layers 10-11
    …
    rank 3: chunk 0 → layers 6-7,  chunk 1 → layers 14-15

Layer counts (the rule, Megatron-Core's):

- by default every model chunk holds ``num_layers / (pipeline * virtual)`` layers; a count that
  does not divide is a ConfigError showing the arithmetic;
- ``first_stage_layers`` / ``last_stage_layers`` (Megatron's ``num_layers_in_first_pipeline_stage``
  / ``..._last_...``) give the first / last stage that many layers in all, split evenly over its
  ``virtual`` chunks; the remaining layers are split evenly over the other stages and their
  chunks. Each split must be exact, or ConfigError.

Layers are numbered from 0 and assigned in model-chunk order, so the chunks tile
``range(num_layers)`` exactly once.
"""
from __future__ import annotations

from typing import List, Optional

from .errors import ConfigError


def model_chunk_index(pipeline_rank: int, chunk: int, pipeline: int, virtual: int) -> int:
    """The model chunk held as chunk ``chunk`` by ``pipeline_rank``: ``chunk * pipeline + pipeline_rank``."""
    _check_position(pipeline_rank, chunk, pipeline, virtual)
    return chunk * pipeline + pipeline_rank


def layers_per_chunk(num_layers: int, pipeline: int, virtual: int,
                     first_stage_layers: Optional[int] = None,
                     last_stage_layers: Optional[int] = None) -> List[int]:
    """How many layers each chunk of each stage holds: element ``p`` is the count of every one
    of stage ``p``'s ``virtual`` chunks. Raises ConfigError when the layers do not split exactly."""
    _check_sizes(num_layers, pipeline, virtual)
    if first_stage_layers is None and last_stage_layers is None:
        if num_layers % (pipeline * virtual):
            raise ConfigError(
                f"num_layers({num_layers}) is not divisible by pipeline({pipeline}) * "
                f"virtual_pipeline({virtual}) = {pipeline * virtual} model chunks; give "
                "first_stage_layers / last_stage_layers for an uneven first or last stage")
        return [num_layers // (pipeline * virtual)] * pipeline
    if pipeline < 2:
        raise ConfigError(f"first_stage_layers / last_stage_layers need pipeline >= 2, got pipeline({pipeline})")
    ends = {0: first_stage_layers, pipeline - 1: last_stage_layers}
    for name, count in (("first_stage_layers", first_stage_layers), ("last_stage_layers", last_stage_layers)):
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count % virtual:
            raise ConfigError(f"{name}({count!r}) must be a non-negative multiple of "
                              f"virtual_pipeline({virtual}): each of the stage's chunks holds the same count")
    given = [count for count in ends.values() if count is not None]
    middle_layers = num_layers - sum(given)
    middle_stages = pipeline - len(given)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
            middle_stages and middle_layers % (middle_stages * virtual)):
        raise ConfigError(
            f"num_layers({num_layers}) - first_stage_layers({first_stage_layers}) - "
            f"last_stage_layers({last_stage_layers}) = {middle_layers} layers do not split evenly over "
            f"the other {middle_stages} stage(s) * virtual_pipeline({virtual}) chunks")
    middle = middle_layers // (middle_stages * virtual) if middle_stages else 0
    return [ends[p] // virtual if ends.get(p) is not None else middle for p in range(pipeline)]


def chunk_layers(num_layers: int, pipeline: int, virtual: int, pipeline_rank: int, chunk: int,
                 first_stage_layers: Optional[int] = None,
                 last_stage_layers: Optional[int] = None) -> range:
    """The layers (a ``range`` of 0-based layer numbers) of chunk ``chunk`` on ``pipeline_rank``."""
    _check_position(pipeline_rank, chunk, pipeline, virtual)
    sizes = layers_per_chunk(num_layers, pipeline, virtual, first_stage_layers, last_stage_layers)
    start = chunk * sum(sizes) + sum(sizes[:pipeline_rank])  # every earlier model chunk, in order
    return range(start, start + sizes[pipeline_rank])


def layer_map(num_layers: int, pipeline: int, virtual: int,
              first_stage_layers: Optional[int] = None,
              last_stage_layers: Optional[int] = None) -> List[List[range]]:
    """The whole map: ``layer_map(...)[p][c]`` is the layers of chunk ``c`` on pipeline rank ``p``."""
    return [[chunk_layers(num_layers, pipeline, virtual, p, c, first_stage_layers, last_stage_layers)
             for c in range(virtual)] for p in range(pipeline)]


def is_first_stage(pipeline_rank: int, pipeline: int, virtual: int, chunk: Optional[int] = None) -> bool:
    """Whether ``pipeline_rank`` (and, given, its chunk ``chunk``) holds the model's first layers:
    pipeline rank 0, and chunk 0 when ``chunk`` is given. ``chunk=None`` ignores chunks, as
    Megatron-Core's ``is_pipeline_first_stage(ignore_virtual=True)``."""
    _check_position(pipeline_rank, 0 if chunk is None else chunk, pipeline, virtual)
    return pipeline_rank == 0 and (chunk is None or chunk == 0)


def is_last_stage(pipeline_rank: int, pipeline: int, virtual: int, chunk: Optional[int] = None) -> bool:
    """Whether ``pipeline_rank`` (and, given, its chunk ``chunk``) holds the model's last layers:
    the last pipeline rank, and its last chunk when ``chunk`` is given."""
    _check_position(pipeline_rank, 0 if chunk is None else chunk, pipeline, virtual)
    return pipeline_rank == pipeline - 1 and (chunk is None or chunk == virtual - 1)


def _check_sizes(num_layers: int, pipeline: int, virtual: int) -> None:
    for name, value, low in (("num_layers", num_layers, 1), ("pipeline", pipeline, 1),
                             ("virtual_pipeline", virtual, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_position(pipeline_rank: int, chunk: int, pipeline: int, virtual: int) -> None:
    _check_sizes(1, pipeline, virtual)
    for name, value, size in (("pipeline rank", pipeline_rank, pipeline), ("chunk", chunk, virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise ValueError(f"{name} {value!r} is outside 0..{size - 1}")
