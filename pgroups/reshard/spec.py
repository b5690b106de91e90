"""What model state looks like, independent of any layout: one :class:`TensorSpec` per tensor.

A tensor spec says
- ``name``, global ``shape`` and ``dtype``;
- ``tp_dim``: the dim tensor parallelism splits, or None when every TP rank holds all of it;
- ``layer``: the pipeline layer it belongs to (``"embedding"``, an int ``0..num_layers-1``,
  or ``"head"``); embedding goes to the first stage, head to the last;
- ``blocks``: how the split dim is made of sub-blocks that are split *separately* (fused
  layouts). A TP rank's shard is the concatenation, in block order, of its share of every
  block. Plain tensors have one block; fused QKV has three (Q, K, V) or, in Megatron's
  interleaved layout, three per query group; fused gate/up has two.
- ``experts``: for a routed-expert tensor, how it is placed by expert parallelism (a grouped
  ``[E, …]`` weight split on its expert dim, or one tensor per expert held by that expert's
  owner); TP is then the layout's *expert* tensor parallelism.

Shares, the functional contract (the shards a TP group holds compute what the full layer does):
- plain blocks are balanced and need no divisibility: ``n`` units over ``T`` ranks give the first
  ``n % T`` ranks one unit more (``numpy.array_split``); gate/up and down_proj use the same rule
  on the same ffn size, so they split together;
- attention blocks (:class:`Heads`) follow :func:`attention_heads`: query heads are split by whole
  query groups when ``T <= kv_heads``, else by whole heads; a rank's KV heads are exactly those its
  query heads use (replicated over ranks when needed, as vLLM does); o_proj's input columns are a
  ``Heads`` block too, so they follow the query heads. ``T > heads`` (a rank with no query head)
  cannot run and is refused (:meth:`TensorSpec.tp_problem`).

A :class:`ModelSpec` is the tensors plus ``num_layers``. Build one from YAML
(:func:`load_model_spec`), from a ``torch.nn.Module`` plus a few :class:`Rule` s
(:func:`spec_from_module`), or with :func:`llama_like` for a synthetic decoder.
Pure: no processes, no torch.distributed.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attrs
import torch

from ..config import read_yaml
from ..errors import ConfigError, allowed, did_you_mean

EMBEDDING = "embedding"
HEAD = "head"
#: a tensor shared by the embedding and the head (tied word embeddings): held by the first and
#: the last pipeline stage
TIED = "tied"
LayerRef = Union[int, str]

#: dtype names accepted in specs (torch attribute names)
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
    "float8_e4m3fn": getattr(torch, "float8_e4m3fn", torch.uint8),
}

#: (start, stop) along the split axis of the global tensor, and where it sits in the local shard
Piece = Tuple[int, int, int]   # (global_start, global_stop, local_start)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Any, where: str = "") -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` → torch.bfloat16; ConfigError naming what is allowed."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
        return DTYPES[value.replace("torch.", "")]
    raise ConfigError(f"{where}dtype {value!r} is not known; allowed: {allowed(DTYPES)}")


def balanced_share(units: int, parts: int, index: int) -> Tuple[int, int]:
    """Units ``[start, stop)`` of part ``index`` when ``units`` are cut into ``parts`` balanced
    contiguous parts (the first ``units % parts`` parts get one more)."""
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def attention_heads(num_heads: int, num_kv_heads: int, tp_size: int,
                    tp_rank: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((q_start, q_stop), (kv_start, kv_stop))``: the query and KV heads TP rank ``tp_rank``
    of ``tp_size`` holds for grouped-query attention (``num_kv_heads`` divides ``num_heads``).

    ``tp_size <= num_kv_heads``: whole query groups, balanced (kv heads = the rank's groups);
    else whole query heads, balanced, and the KV heads those query heads use — one when
    ``tp_size`` is a multiple of ``num_kv_heads`` (vLLM's replication), two where a rank's query
    heads straddle two groups. A rank may get no query head only when ``tp_size > num_heads``.
    """
    group = num_heads // num_kv_heads
    if tp_size <= num_kv_heads:
        first, last = balanced_share(num_kv_heads, tp_size, tp_rank)
        return (first * group, last * group), (first, last)
    q_start, q_stop = balanced_share(num_heads, tp_size, tp_rank)
    if q_stop == q_start:
        return (q_start, q_start), (0, 0)
    return (q_start, q_stop), (q_start // group, -(-q_stop // group))


@attrs.frozen
class Heads:
    """A block made of attention heads: query heads (``role="q"``: Q rows, or o_proj's input
    columns) or KV heads (``role="kv"``: K or V rows), heads ``first..first+n`` of the layer's
    ``num_heads`` / ``num_kv_heads``; each TP rank holds the ones :func:`attention_heads` gives."""

    role: str
    num_heads: int
    num_kv_heads: int
    first: int = 0

    def held(self, tp_size: int, tp_rank: int) -> Tuple[int, int]:
        q, kv = attention_heads(self.num_heads, self.num_kv_heads, tp_size, tp_rank)
        return q if self.role == "q" else kv


@attrs.frozen
class Block:
    """A sub-block of a split dim: ``size`` rows, split across TP ranks in whole ``unit`` s.

    ``replicate``: with fewer units than TP ranks, every rank holds one unit instead of some
    ranks holding none. ``heads``: the block is attention heads of size ``unit`` each, shared out
    by :func:`attention_heads` (see :class:`Heads`).
    """

    size: int
    unit: int = 1
    replicate: bool = False
    name: str = ""
    heads: Optional[Heads] = None

    def share(self, tp_size: int, tp_rank: int) -> Tuple[int, int]:
        """Rows ``[start, stop)`` of this block that TP rank ``tp_rank`` of ``tp_size`` holds."""
        units = self.size // self.unit
        if self.heads is not None:
            low, high = self.heads.held(tp_size, tp_rank)
            start, stop = max(low, self.heads.first), min(high, self.heads.first + units)
            if stop <= start:
                return 0, 0
            return (start - self.heads.first) * self.unit, (stop - self.heads.first) * self.unit
        if self.replicate and units < tp_size:
            held = tp_rank * units // tp_size
            return held * self.unit, (held + 1) * self.unit
        start, stop = balanced_share(units, tp_size, tp_rank)
        return start * self.unit, stop * self.unit


@attrs.frozen
class Experts:
    """Where a routed-expert tensor lives in expert parallelism (EP): ``num_experts`` experts
    are cut into balanced contiguous ranges over the EP ranks. A grouped weight has them on dim
    ``dim`` (``shape[dim] == num_experts``); a per-expert tensor (``index``) is held whole by the
    EP rank that owns expert ``index``. Give exactly one of ``dim`` / ``index``."""

    num_experts: int
    dim: Optional[int] = None
    index: Optional[int] = None

    def owned(self, ep_size: int, ep_rank: int) -> Tuple[int, int]:
        """Experts ``[start, stop)`` EP rank ``ep_rank`` of ``ep_size`` owns."""
        return balanced_share(self.num_experts, ep_size, ep_rank)

    def owner(self, ep_size: int, expert: int) -> int:
        """The EP rank owning ``expert`` (the inverse of :meth:`owned`)."""
        base, extra = divmod(self.num_experts, ep_size)
        if expert < extra * (base + 1):
            return expert // (base + 1)
        return extra + (expert - extra * (base + 1)) // base


@attrs.frozen
class TensorSpec:
    """One tensor of the model; see the module docstring. Build with :meth:`create` (validates)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    tp_dim: Optional[int]
    layer: LayerRef
    blocks: Tuple[Block, ...]
    experts: Optional[Experts] = None
    vocab: bool = False

    @classmethod
    def create(cls, name: str, shape: Sequence[int], dtype: Any = "float32", tp_dim: Optional[int] = None,
               layer: LayerRef = 0, blocks: Optional[Sequence[Block]] = None,
               where: str = "", experts: Optional[Experts] = None, vocab: bool = False) -> "TensorSpec":
        """Validate and build. ``blocks`` default to one plain block spanning the split dim.
        ``vocab``: the split dim is a vocabulary, which a layout may pad (see :meth:`pieces`).

        Raises ConfigError naming the tensor and the field that is wrong.
        """
        at = f"{where}tensor {name!r}: "
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}every tensor needs a non-empty string name, got {name!r}")
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ConfigError(f"{at}shape must be a list of non-negative integers, got {shape!r}")
        shape = tuple(shape)
        torch_dtype = parse_dtype(dtype, at)
        if tp_dim is not None:
            if isinstance(tp_dim, bool) or not isinstance(tp_dim, int) or not -len(shape) <= tp_dim < len(shape):
                raise ConfigError(f"{at}tp_dim {tp_dim!r} is not a dim of shape {list(shape)}; "
                                  f"allowed: null (replicated) or 0..{len(shape) - 1}")
            tp_dim %= len(shape)
        if not (layer in (EMBEDDING, HEAD, TIED) or (isinstance(layer, int) and not isinstance(layer, bool)
                                                      and layer >= 0)):
            raise ConfigError(f"{at}layer {layer!r} must be 'embedding', 'head', 'tied' (both) or a layer "
                              "index >= 0")
        axis_len = shape[tp_dim] if tp_dim is not None else 0
        if blocks is None or len(blocks) == 0:
            blocks = (Block(axis_len),) if tp_dim is not None else ()
        else:
            if tp_dim is None:
                raise ConfigError(f"{at}fused sub-blocks need a tp_dim (a replicated tensor is never split)")
            blocks = tuple(blocks)
            total = sum(b.size for b in blocks)
            if total != axis_len:
                sizes = " + ".join(str(b.size) for b in blocks)
                raise ConfigError(f"{at}fused sub-blocks {sizes} = {total} != shape[{tp_dim}] = {axis_len}")
            for block in blocks:
                if block.unit < 1 or block.size % block.unit:
                    raise ConfigError(f"{at}sub-block {block.name or block.size!r}: size {block.size} "
                                      f"is not a whole number of units of {block.unit}")
        if experts is not None:
            _check_experts(experts, shape, tp_dim, at)
        if vocab and (tp_dim is None or len(blocks) != 1 or blocks[0].unit != 1 or blocks[0].heads is not None):
            raise ConfigError(f"{at}a vocabulary (vocab: true) must be split on a tp_dim, with no fused sub-blocks")
        return cls(name, shape, torch_dtype, tp_dim, layer, tuple(blocks), experts, bool(vocab))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def axis(self) -> int:
        """The axis intervals run along: ``tp_dim``, or 0 for a replicated tensor."""
        return self.tp_dim if self.tp_dim is not None else 0

    @property
    def axis_len(self) -> int:
        """Length of :attr:`axis` (1 for a 0-d tensor, which is viewed as shape ``(1,)``)."""
        return self.shape[self.axis] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along :attr:`axis` (the product of the other dims)."""
        if not self.shape:
            return self.itemsize
        return self.numel // self.shape[self.axis] * self.itemsize if self.shape[self.axis] else 0

    @property
    def is_expert(self) -> bool:
        return self.experts is not None

    def expert_range(self, ep_size: int, ep_rank: int) -> Optional[Tuple[int, int]]:
        """Experts ``[start, stop)`` of a grouped weight EP rank ``ep_rank`` holds (None when the
        tensor has no expert dim)."""
        if self.experts is None or self.experts.dim is None:
            return None
        return self.experts.owned(ep_size, ep_rank)

    def held_by(self, ep_size: int, ep_rank: int) -> bool:
        """Whether EP rank ``ep_rank`` holds (part of) this tensor: a per-expert tensor only on its
        owner; every other tensor everywhere in its stage."""
        if self.experts is None or self.experts.index is None:
            return True
        return self.experts.owner(ep_size, self.experts.index) == ep_rank

    def tp_problem(self, tp_size: int) -> Optional[str]:
        """Why the shards of TP size ``tp_size`` cannot compute (None when they can): attention
        heads over more ranks than query heads leave a rank with no query head."""
        for block in self.blocks:
            if block.heads is not None and tp_size > block.heads.num_heads:
                h = block.heads
                return (f"tensor {self.name!r}: {h.num_heads} query heads / {h.num_kv_heads} KV heads cannot be "
                        f"split over tensor parallel size {tp_size}: TP rank {h.num_heads} would hold no query "
                        f"head; allowed: a TP size of at most {h.num_heads}")
        return None

    def padded_rows(self, tp_size: int, vocab_multiple: Optional[int]) -> Optional[int]:
        """Rows per TP rank of a vocabulary padded as Megatron pads it (None: not padded): the
        vocabulary rounded up to a multiple of ``vocab_multiple * tp_size``, split evenly."""
        if not self.vocab or not vocab_multiple:
            return None
        step = vocab_multiple * tp_size
        return -(-self.axis_len // step) * step // tp_size

    def pieces(self, tp_size: int, tp_rank: int, vocab_multiple: Optional[int] = None) -> Tuple[Piece, ...]:
        """The intervals along :attr:`axis` that TP rank ``tp_rank`` of ``tp_size`` holds, as
        ``(global_start, global_stop, local_start)`` in local order; empty pieces are dropped.
        A vocabulary padded with ``vocab_multiple`` (:meth:`padded_rows`): rank ``r`` holds padded
        rows ``[r * n, (r + 1) * n)``; its piece is their real part, the rest is padding."""
        if self.tp_dim is None:
            return ((0, self.axis_len, 0),)
        per = self.padded_rows(tp_size, vocab_multiple)
        if per is not None:
            start, stop = tp_rank * per, min((tp_rank + 1) * per, self.axis_len)
            return ((start, stop, 0),) if stop > start else ()
        result, local, offset = [], 0, 0
        for block in self.blocks:
            start, stop = block.share(tp_size, tp_rank)
            if stop > start:
                result.append((offset + start, offset + stop, local))
                local += stop - start
            offset += block.size
        return tuple(result)

    def local_shape(self, tp_size: int, tp_rank: int, ep_size: int = 1, ep_rank: int = 0,
                    vocab_multiple: Optional[int] = None) -> Tuple[int, ...]:
        """Shape of the shard TP rank ``tp_rank`` of ``tp_size`` (and, for a grouped expert
        weight, EP rank ``ep_rank`` of ``ep_size``; a padded vocabulary included) holds."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            per = self.padded_rows(tp_size, vocab_multiple)
            shape[self.tp_dim] = per if per is not None else sum(
                stop - start for start, stop, _ in self.pieces(tp_size, tp_rank))
        experts = self.expert_range(ep_size, ep_rank)
        if experts is not None:
            shape[self.experts.dim] = experts[1] - experts[0]
        return tuple(shape)

    def shard(self, full: torch.Tensor, tp_size: int, tp_rank: int, ep_size: int = 1,
              ep_rank: int = 0, vocab_multiple: Optional[int] = None) -> torch.Tensor:
        """Cut the shard of TP rank ``tp_rank`` (and EP rank ``ep_rank``) from the ``full`` tensor
        (a new contiguous tensor; vocabulary padding rows are zeros)."""
        experts = self.expert_range(ep_size, ep_rank)
        if experts is not None:
            full = full.narrow(self.experts.dim, experts[0], experts[1] - experts[0])
        if self.tp_dim is None:
            return full.clone()
        shape = self.local_shape(tp_size, tp_rank, ep_size, ep_rank, vocab_multiple)
        parts = [full.narrow(self.tp_dim, start, stop - start)
                 for start, stop, _ in self.pieces(tp_size, tp_rank, vocab_multiple)]
        rows = sum(p.shape[self.tp_dim] for p in parts)
        if rows < shape[self.tp_dim]:
            pad = list(shape)
            pad[self.tp_dim] -= rows
            parts.append(full.new_zeros(pad))
        return torch.cat(parts, dim=self.tp_dim).contiguous() if parts else full.new_zeros(shape)


def _check_experts(experts: Experts, shape: Tuple[int, ...], tp_dim: Optional[int], at: str) -> None:
    """ConfigError unless ``experts`` fits a tensor of ``shape`` split on ``tp_dim``."""
    if isinstance(experts.num_experts, bool) or not isinstance(experts.num_experts, int) or experts.num_experts < 1:
        raise ConfigError(f"{at}experts.num must be a positive integer, got {experts.num_experts!r}")
    if (experts.dim is None) == (experts.index is None):
        raise ConfigError(f"{at}experts needs exactly one of 'dim' (a grouped [E, ...] weight) or 'index' "
                          "(one tensor per expert)")
    if experts.dim is not None:
        if isinstance(experts.dim, bool) or not isinstance(experts.dim, int) or not 0 <= experts.dim < len(shape):
            raise ConfigError(f"{at}experts.dim {experts.dim!r} is not a dim of shape {list(shape)}")
        if shape[experts.dim] != experts.num_experts:
            raise ConfigError(f"{at}experts.dim {experts.dim}: shape[{experts.dim}] = {shape[experts.dim]} "
                              f"!= num experts {experts.num_experts}")
        if experts.dim == tp_dim:
            raise ConfigError(f"{at}experts.dim {experts.dim} is also the tp_dim; expert tensor parallelism "
                              "splits another dim")
    elif isinstance(experts.index, bool) or not isinstance(experts.index, int) or not (
            0 <= experts.index < experts.num_experts):
        raise ConfigError(f"{at}experts.index {experts.index!r} must be in 0..{experts.num_experts - 1}")


# ---- fused layouts ----------------------------------------------------------------------------
def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int, what: str) -> None:
    for key, value in (("heads", num_heads), ("kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what}: {key} must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{what}: kv_heads({num_kv_heads}) must divide heads({num_heads}) "
                          "(the GQA ratio is heads / kv_heads)")


def qkv_blocks(num_heads: int, num_kv_heads: int, head_dim: int) -> Tuple[Block, ...]:
    """Fused QKV ``[Q; K; V]`` with grouped-query attention (GQA ratio ``num_heads/num_kv_heads``):
    each TP rank's shard is its ``[q; k; v]`` (vLLM's QKVParallelLinear), heads per
    :func:`attention_heads`. Raises ConfigError unless ``num_kv_heads`` divides ``num_heads``."""
    _check_heads(num_heads, num_kv_heads, head_dim, "fused qkv")
    return (Block(num_heads * head_dim, head_dim, False, "q", Heads("q", num_heads, num_kv_heads)),
            Block(num_kv_heads * head_dim, head_dim, False, "k", Heads("kv", num_heads, num_kv_heads)),
            Block(num_kv_heads * head_dim, head_dim, False, "v", Heads("kv", num_heads, num_kv_heads)))


def qkv_interleaved_blocks(num_heads: int, num_kv_heads: int, head_dim: int) -> Tuple[Block, ...]:
    """Megatron-Core's fused QKV: per query group ``g``, its query heads, then its K head, then
    its V head (``[q_g…; k_g; v_g]`` for g = 0..kv_heads-1). Shared out by :func:`attention_heads`
    like :func:`qkv_blocks`, so a rank holds its groups' rows in the same interleaved order."""
    _check_heads(num_heads, num_kv_heads, head_dim, "fused qkv_interleaved")
    group = num_heads // num_kv_heads
    blocks: List[Block] = []
    for g in range(num_kv_heads):
        blocks += [Block(group * head_dim, head_dim, False, f"q{g}", Heads("q", num_heads, num_kv_heads, g * group)),
                   Block(head_dim, head_dim, False, f"k{g}", Heads("kv", num_heads, num_kv_heads, g)),
                   Block(head_dim, head_dim, False, f"v{g}", Heads("kv", num_heads, num_kv_heads, g))]
    return tuple(blocks)


def head_blocks(num_heads: int, num_kv_heads: int, head_dim: int, role: str = "q") -> Tuple[Block, ...]:
    """One tensor of attention heads: a separate q_proj (``role="q"``), k_proj / v_proj
    (``role="kv"``), or o_proj's input columns (``role="q"``: they follow the query heads)."""
    _check_heads(num_heads, num_kv_heads, head_dim, "fused heads")
    if role not in ("q", "kv"):
        raise ConfigError(f"fused heads: role {role!r} is not known; allowed: 'kv', 'q'")
    count = num_heads if role == "q" else num_kv_heads
    return (Block(count * head_dim, head_dim, False, role, Heads(role, num_heads, num_kv_heads)),)


def parts_blocks(sizes: Sequence[int], unit: int = 1, names: Sequence[str] = ()) -> Tuple[Block, ...]:
    """Fused equal-role parts such as gate/up ``[G; U]``: each part split separately."""
    names = tuple(names) or tuple(f"part{i}" for i in range(len(sizes)))
    return tuple(Block(size, unit, False, name) for size, name in zip(sizes, names))


# ---- the model ---------------------------------------------------------------------------------
@attrs.frozen
class ModelSpec:
    """The tensors of a model (unique names, in order) and its number of transformer layers."""

    tensors: Tuple[TensorSpec, ...]
    num_layers: int
    name: str = "model"

    @classmethod
    def create(cls, tensors: Sequence[TensorSpec], num_layers: Optional[int] = None,
               name: str = "model", where: str = "") -> "ModelSpec":
        """Validate: unique names, layer indices below ``num_layers`` (default: max index + 1)."""
        seen: Dict[str, TensorSpec] = {}
        for spec in tensors:
            if spec.name in seen:
                raise ConfigError(f"{where}tensor {spec.name!r} is listed twice")
            seen[spec.name] = spec
        indices = [t.layer for t in tensors if isinstance(t.layer, int)]
        if num_layers is None:
            num_layers = max(indices) + 1 if indices else 0
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ConfigError(f"{where}num_layers must be a non-negative integer, got {num_layers!r}")
        for spec in tensors:
            if isinstance(spec.layer, int) and spec.layer >= num_layers:
                raise ConfigError(f"{where}tensor {spec.name!r}: layer {spec.layer} is outside "
                                  f"0..{num_layers - 1} (num_layers {num_layers})")
        return cls(tuple(tensors), num_layers, name)

    def __getitem__(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(f"no tensor {name!r} in model {self.name!r}{did_you_mean(name, self.names)}")

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def layer_bytes(self) -> Tuple[int, int, List[int]]:
        """``(embedding bytes, head bytes, bytes of each layer)``: the weights stage policies balance."""
        per_layer = [0] * self.num_layers
        embedding = head = 0
        for spec in self.tensors:
            if spec.layer in (EMBEDDING, TIED):
                embedding += spec.nbytes
            if spec.layer in (HEAD, TIED):
                head += spec.nbytes
            if isinstance(spec.layer, int):
                per_layer[spec.layer] += spec.nbytes
        return embedding, head, per_layer


# ---- building specs: YAML ---------------------------------------------------------------------
_TENSOR_KEYS = ("name", "shape", "dtype", "tp_dim", "layer", "fused", "experts", "vocab")
_MODEL_KEYS = ("name", "num_layers", "dtype", "tensors", "synthetic")
_FUSED_KINDS = ("qkv", "qkv_interleaved", "heads", "parts")
_HEADS_KEYS = ("heads", "kv_heads", "head_dim")
_EXPERTS_KEYS = ("num", "dim", "index")
_PARTS_KEYS = ("sizes", "unit", "names")
LAYER_PLACEHOLDER = "{layer}"
EXPERT_PLACEHOLDER = "{expert}"


def load_model_spec(obj: Union[str, "os.PathLike[str]", Mapping[str, Any]], source: Optional[str] = None) -> ModelSpec:
    """A ModelSpec from a YAML file path, a YAML string or a mapping::

        name: tiny
        num_layers: 2
        dtype: bfloat16                  # default for tensors without one
        tensors:
          - {name: embed.weight, shape: [1000, 64], tp_dim: 0, layer: embedding}
          - name: "layers.{layer}.attn.qkv.weight"   # one tensor per layer
            shape: [128, 64]
            tp_dim: 0
            fused: {qkv: {heads: 4, kv_heads: 2, head_dim: 16}}
          - name: "layers.{layer}.mlp.gate_up.weight"
            shape: [256, 64]
            tp_dim: 0
            fused: {parts: {sizes: [128, 128], names: [gate, up]}}   # roles a name map splits by
          - {name: "layers.{layer}.mlp.down.weight", shape: [64, 128], tp_dim: 1}
          - {name: norm.weight, shape: [64], layer: head}
          - {name: lm_head.weight, shape: [1000, 64], tp_dim: 0, layer: head}

    or ``synthetic: {hidden: ..., layers: ..., ...}`` (the arguments of :func:`llama_like`).
    A name containing ``{layer}`` is repeated for every layer. Raises ConfigError with the
    source, the tensor and the key for every bad input.
    """
    if isinstance(obj, Mapping):
        return model_spec_from_dict(obj, source or "<model spec>")
    data, source = read_yaml(obj, "model spec", source)
    return model_spec_from_dict(data, source)


def model_spec_from_dict(data: Any, source: str = "<model spec>") -> ModelSpec:
    """Validate a mapping (as YAML gives it) into a ModelSpec; see :func:`load_model_spec`."""
    where = f"{source}: "
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}a model spec must be a mapping with 'tensors:' (or 'synthetic:'), "
                          f"got {type(data).__name__}")
    _reject_unknown(data, _MODEL_KEYS, "", where)
    name = str(data.get("name", Path(source).stem if source.endswith((".yaml", ".yml")) else "model"))
    if "synthetic" in data:
        if "tensors" in data:
            raise ConfigError(f"{where}give either 'tensors:' or 'synthetic:', not both")
        options = data["synthetic"] or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}synthetic must be a mapping of llama_like options, got {options!r}")
        try:
            return llama_like(**{str(k): v for k, v in options.items()}, name=name)
        except TypeError as exc:
            raise ConfigError(f"{where}synthetic: {exc}") from None
    tensors_data = data.get("tensors")
    if not isinstance(tensors_data, list) or not tensors_data:
        raise ConfigError(f"{where}tensors must be a non-empty list of tensor entries, got {tensors_data!r}")
    num_layers = data.get("num_layers")
    default_dtype = data.get("dtype", "float32")
    tensors: List[TensorSpec] = []
    for index, entry in enumerate(tensors_data):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}tensors[{index}] must be a mapping with name and shape, got {entry!r}")
        _reject_unknown(entry, _TENSOR_KEYS, f"tensors[{index}].", where)
        for key in ("name", "shape"):
            if key not in entry:
                raise ConfigError(f"{where}tensors[{index}]: missing {key!r}")
        raw_name = entry["name"]
        if not isinstance(raw_name, str):
            raise ConfigError(f"{where}tensors[{index}].name must be a string, got {raw_name!r}")
        tp_dim = entry.get("tp_dim")
        shape = entry["shape"]
        at = f"{where}tensor {raw_name!r}: "
        blocks = _fused_blocks(entry.get("fused"), at)
        per_expert = _expert_entries(entry.get("experts"), raw_name, at)
        if LAYER_PLACEHOLDER in raw_name:
            if "layer" in entry:
                raise ConfigError(f"{at}a name with {{layer}} is repeated per layer; drop its 'layer:' key")
            if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
                raise ConfigError(f"{where}tensor {raw_name!r} uses {{layer}}: set num_layers (a positive "
                                  "integer) at the top of the spec")
            layers: List[LayerRef] = list(range(num_layers))
        else:
            if "layer" not in entry:
                raise ConfigError(f"{at}missing 'layer' (an index, 'embedding' or 'head'; or put {{layer}} in "
                                  "the name to repeat it per layer)")
            layers = [entry["layer"]]
        for layer in layers:
            for expert_name, experts in per_expert:
                tensor_name = expert_name.replace(LAYER_PLACEHOLDER, str(layer))
                tensors.append(TensorSpec.create(tensor_name, shape, entry.get("dtype", default_dtype), tp_dim,
                                                 layer, blocks, where, experts, entry.get("vocab", False)))
    return ModelSpec.create(tensors, num_layers, name, where)


def _expert_entries(value: Any, raw_name: str, at: str) -> List[Tuple[str, Optional[Experts]]]:
    """``experts: {num, dim}`` (grouped) / ``{num, index}`` / ``{num}`` with ``{expert}`` in the name
    (one tensor per expert) → ``[(name, Experts)]``; no ``experts:`` → ``[(name, None)]``."""
    if value is None:
        if EXPERT_PLACEHOLDER in raw_name:
            raise ConfigError(f"{at}a name with {{expert}} needs 'experts: {{num: N}}'")
        return [(raw_name, None)]
    if not isinstance(value, Mapping) or "num" not in value:
        raise ConfigError(f"{at}experts must be a mapping with 'num' and one of 'dim' / 'index' (or {{expert}} "
                          f"in the name), got {value!r}")
    _reject_unknown(value, _EXPERTS_KEYS, "experts.", at)
    num = value["num"]
    if EXPERT_PLACEHOLDER in raw_name:
        if "dim" in value or "index" in value:
            raise ConfigError(f"{at}a name with {{expert}} is repeated per expert; drop experts.dim / index")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"{at}experts.num must be a positive integer, got {num!r}")
        return [(raw_name.replace(EXPERT_PLACEHOLDER, str(e)), Experts(num, index=e)) for e in range(num)]
    return [(raw_name, Experts(num, value.get("dim"), value.get("index")))]


def _fused_blocks(value: Any, at: str) -> Optional[Tuple[Block, ...]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{at}fused must be one of {{qkv | qkv_interleaved | heads: {{heads, kv_heads, "
                          f"head_dim}}}} or {{parts: [sizes]}}, got {value!r}")
    (kind, options), = value.items()
    if kind in ("qkv", "qkv_interleaved", "heads"):
        keys = _HEADS_KEYS + (("role",) if kind == "heads" else ())
        if not isinstance(options, Mapping) or not set(_HEADS_KEYS) <= set(options) <= set(keys):
            raise ConfigError(f"{at}fused.{kind} needs {allowed(_HEADS_KEYS)}"
                              f"{' (and optionally role: q or kv)' if kind == 'heads' else ''}, got {options!r}")
        try:
            if kind == "heads":
                return head_blocks(options["heads"], options["kv_heads"], options["head_dim"],
                                   options.get("role", "q"))
            build = qkv_blocks if kind == "qkv" else qkv_interleaved_blocks
            return build(options["heads"], options["kv_heads"], options["head_dim"])
        except ConfigError as exc:
            raise ConfigError(f"{at}{exc}") from None
    if kind == "parts":
        return _parts_blocks(options, at)
    raise ConfigError(f"{at}fused: unknown layout {kind!r}{did_you_mean(str(kind), _FUSED_KINDS)}; "
                      f"allowed: {allowed(_FUSED_KINDS)}")


def _parts_blocks(options: Any, at: str) -> Tuple[Block, ...]:
    """``fused: {parts: [sizes]}`` or ``{parts: {sizes: [...], unit: U, names: [...]}}``: the part
    names are the roles a name map splits by (default ``part0``, ``part1``, …)."""
    if isinstance(options, Mapping):
        _reject_unknown(options, _PARTS_KEYS, "fused.parts.", at)
        sizes, unit, names = options.get("sizes"), options.get("unit", 1), options.get("names", ())
    else:
        sizes, unit, names = options, 1, ()
    if not isinstance(sizes, list) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"{at}fused.parts must be a list of positive sizes, got {sizes!r}")
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise ConfigError(f"{at}fused.parts.unit must be a positive integer, got {unit!r}")
    if names and (not isinstance(names, list) or len(names) != len(sizes) or len(set(names)) != len(names)
                  or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{at}fused.parts.names must be {len(sizes)} distinct names, one per size "
                          f"(e.g. [gate, up]), got {names!r}")
    return parts_blocks(sizes, unit, names)


def _reject_unknown(data: Mapping[str, Any], known: Tuple[str, ...], prefix: str, where: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}{prefix}{key}: unknown key{did_you_mean(str(key), known)}; "
                              f"allowed: {allowed(known)}")


# ---- building specs: from a module ---------------------------------------------------------------
@attrs.frozen
class Rule:
    """How the parameters whose name matches ``pattern`` (``re.search``) are laid out.

    ``tp_dim`` None means replicated; ``layer`` overrides the layer found by the module's
    layer pattern (use ``"embedding"`` / ``"head"`` for tensors outside the layers); ``blocks``
    gives a fused layout (:func:`qkv_blocks`, :func:`parts_blocks`).
    """

    pattern: str
    tp_dim: Optional[int] = None
    layer: Optional[LayerRef] = None
    blocks: Optional[Tuple[Block, ...]] = None


#: finds the layer index in names such as ``model.layers.3.mlp.up.weight`` or ``h.3.attn.w``
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\."


def spec_from_module(module: torch.nn.Module, rules: Sequence[Rule],
                     layer_pattern: str = DEFAULT_LAYER_PATTERN, name: str = "model",
                     include_buffers: bool = False) -> ModelSpec:
    """A ModelSpec for the parameters (and, optionally, persistent buffers) of ``module``.

    The first rule whose pattern matches a name decides its layout; a name that matches no rule
    is replicated. The layer comes from the rule, else from ``layer_pattern``'s first group.
    Shapes and dtypes are the module's own (the *full* model). Raises ConfigError naming a
    tensor whose layer cannot be found.
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    layer_re = re.compile(layer_pattern)
    named = list(module.named_parameters())
    if include_buffers:
        named += list(module.named_buffers())
    tensors = []
    for tensor_name, tensor in named:
        rule = next((r for rx, r in compiled if rx.search(tensor_name)), None)
        layer = rule.layer if rule is not None and rule.layer is not None else None
        if layer is None:
            match = layer_re.search(tensor_name)
            if match is None:
                raise ConfigError(f"tensor {tensor_name!r}: no layer index found by pattern {layer_pattern!r} "
                                  "and no rule gives one; add Rule(pattern, layer='embedding' or 'head')")
            layer = int(match.group(1))
        tensors.append(TensorSpec.create(tensor_name, tuple(tensor.shape), tensor.dtype,
                                         rule.tp_dim if rule else None, layer,
                                         rule.blocks if rule else None))
    return ModelSpec.create(tensors, name=name)


# ---- a synthetic decoder --------------------------------------------------------------------------
def llama_like(hidden: int = 4096, layers: int = 32, heads: int = 32, kv_heads: int = 8,
               ffn: int = 14336, vocab: int = 128256, dtype: Any = "bfloat16",
               name: str = "llama-like", experts: int = 0, expert_ffn: Optional[int] = None,
               shared_ffn: int = 0, grouped_experts: bool = True, tied_embeddings: bool = False) -> ModelSpec:
    """A Llama-style decoder with fused QKV (GQA) and fused gate/up, Megatron TP dims:
    embedding and head split by vocab, QKV and gate/up by output rows, o_proj (by query heads)
    and down_proj by input columns, norms replicated. The defaults are Llama-3-8B's shapes.

    ``experts > 0`` makes every MLP a routed MoE: a router ``[E, hidden]`` (replicated), the
    experts' gate/up and down — grouped ``[E, …]`` weights (``grouped_experts``) or one tensor per
    expert — of ``expert_ffn`` (default ``ffn``) placed by EP / expert TP, and, with
    ``shared_ffn > 0``, a shared expert (a dense MLP). ``tied_embeddings``: one ``embed.weight``
    held by the first and last stage, no ``lm_head.weight``."""
    head_dim = hidden // heads
    qkv = qkv_blocks(heads, kv_heads, head_dim)
    o_heads = head_blocks(heads, kv_heads, head_dim, "q")
    specs = [TensorSpec.create("embed.weight", (vocab, hidden), dtype, 0, TIED if tied_embeddings else EMBEDDING,
                               vocab=True)]
    for i in range(layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec.create(p + "input_norm.weight", (hidden,), dtype, None, i),
            TensorSpec.create(p + "attn.qkv.weight", (sum(b.size for b in qkv), hidden), dtype, 0, i, qkv),
            TensorSpec.create(p + "attn.o.weight", (hidden, heads * head_dim), dtype, 1, i, o_heads),
            TensorSpec.create(p + "post_norm.weight", (hidden,), dtype, None, i),
        ]
        if experts:
            specs += _moe_specs(p + "mlp.", i, hidden, experts, expert_ffn or ffn, shared_ffn, grouped_experts, dtype)
        else:
            specs += _mlp_specs(p + "mlp.", i, hidden, ffn, dtype)
    specs.append(TensorSpec.create("norm.weight", (hidden,), dtype, None, HEAD))
    if not tied_embeddings:
        specs.append(TensorSpec.create("lm_head.weight", (vocab, hidden), dtype, 0, HEAD, vocab=True))
    return ModelSpec.create(specs, layers, name)


def _mlp_specs(prefix: str, layer: int, hidden: int, ffn: int, dtype: Any) -> List[TensorSpec]:
    """A dense gated MLP: fused gate/up split by rows, down by the same ffn columns."""
    return [TensorSpec.create(prefix + "gate_up.weight", (2 * ffn, hidden), dtype, 0, layer,
                              parts_blocks((ffn, ffn), 1, ("gate", "up"))),
            TensorSpec.create(prefix + "down.weight", (hidden, ffn), dtype, 1, layer)]


def _moe_specs(prefix: str, layer: int, hidden: int, experts: int, ffn: int, shared_ffn: int,
               grouped: bool, dtype: Any) -> List[TensorSpec]:
    gate_up = parts_blocks((ffn, ffn), 1, ("gate", "up"))
    specs = [TensorSpec.create(prefix + "router.weight", (experts, hidden), dtype, None, layer)]
    if grouped:
        specs += [TensorSpec.create(prefix + "experts.gate_up.weight", (experts, 2 * ffn, hidden), dtype, 1, layer,
                                    gate_up, experts=Experts(experts, dim=0)),
                  TensorSpec.create(prefix + "experts.down.weight", (experts, hidden, ffn), dtype, 2, layer,
                                    experts=Experts(experts, dim=0))]
    else:
        for e in range(experts):
            specs += [TensorSpec.create(f"{prefix}experts.{e}.gate_up.weight", (2 * ffn, hidden), dtype, 0, layer,
                                        gate_up, experts=Experts(experts, index=e)),
                      TensorSpec.create(f"{prefix}experts.{e}.down.weight", (hidden, ffn), dtype, 1, layer,
                                        experts=Experts(experts, index=e))]
    if shared_ffn:
        specs += _mlp_specs(prefix + "shared.", layer, hidden, shared_ffn, dtype)
    return specs
