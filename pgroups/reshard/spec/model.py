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
(:func:`.from_yaml.load_model_spec`), from a ``torch.nn.Module`` plus a few rules
(:func:`.from_module.spec_from_module`), or with :func:`.synthetic.llama_like` for a synthetic
decoder.
Pure: no processes, no torch.distributed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import attrs
import torch

from ...errors import ConfigError, allowed, did_you_mean

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
