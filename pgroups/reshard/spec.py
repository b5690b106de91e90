"""What model state looks like, independent of any layout: one :class:`TensorSpec` per tensor.

A tensor spec says
- ``name``, global ``shape`` and ``dtype``;
- ``tp_dim``: the dim tensor parallelism splits, or None when every TP rank holds all of it;
- ``layer``: the pipeline layer it belongs to (``"embedding"``, an int ``0..num_layers-1``,
  or ``"head"``); embedding goes to the first stage, head to the last;
- ``blocks``: how the split dim is made of sub-blocks that are split *separately* (fused
  layouts). A TP rank's shard is the concatenation, in block order, of its share of every
  block. Plain tensors have one block; fused QKV has three (Q, K, V, split by whole heads, K and
  V replicated when there are fewer KV heads than TP ranks, as vLLM does); fused gate/up has
  two.

Shares are balanced and need no divisibility: ``n`` units over ``T`` ranks give the first
``n % T`` ranks one unit more (``numpy.array_split``); a block with fewer units than ranks gives
some ranks nothing, unless it is marked ``replicate`` (then rank ``r`` holds unit
``r * n // T``).

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


@attrs.frozen
class Block:
    """A sub-block of a split dim: ``size`` rows, split across TP ranks in whole ``unit`` s.

    ``replicate``: with fewer units than TP ranks, every rank holds one unit (GQA KV heads)
    instead of some ranks holding none.
    """

    size: int
    unit: int = 1
    replicate: bool = False
    name: str = ""

    def share(self, tp_size: int, tp_rank: int) -> Tuple[int, int]:
        """Rows ``[start, stop)`` of this block that TP rank ``tp_rank`` of ``tp_size`` holds."""
        units = self.size // self.unit
        if self.replicate and units < tp_size:
            held = tp_rank * units // tp_size
            return held * self.unit, (held + 1) * self.unit
        start, stop = balanced_share(units, tp_size, tp_rank)
        return start * self.unit, stop * self.unit


@attrs.frozen
class TensorSpec:
    """One tensor of the model; see the module docstring. Build with :meth:`create` (validates)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    tp_dim: Optional[int]
    layer: LayerRef
    blocks: Tuple[Block, ...]

    @classmethod
    def create(cls, name: str, shape: Sequence[int], dtype: Any = "float32", tp_dim: Optional[int] = None,
               layer: LayerRef = 0, blocks: Optional[Sequence[Block]] = None,
               where: str = "") -> "TensorSpec":
        """Validate and build. ``blocks`` default to one plain block spanning the split dim.

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
        if not (layer in (EMBEDDING, HEAD) or (isinstance(layer, int) and not isinstance(layer, bool)
                                                and layer >= 0)):
            raise ConfigError(f"{at}layer {layer!r} must be 'embedding', 'head' or a layer index >= 0")
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
        return cls(name, shape, torch_dtype, tp_dim, layer, tuple(blocks))

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

    def pieces(self, tp_size: int, tp_rank: int) -> Tuple[Piece, ...]:
        """The intervals along :attr:`axis` that TP rank ``tp_rank`` of ``tp_size`` holds, as
        ``(global_start, global_stop, local_start)`` in local order; empty pieces are dropped."""
        if self.tp_dim is None:
            return ((0, self.axis_len, 0),)
        result, local, offset = [], 0, 0
        for block in self.blocks:
            start, stop = block.share(tp_size, tp_rank)
            if stop > start:
                result.append((offset + start, offset + stop, local))
                local += stop - start
            offset += block.size
        return tuple(result)

    def local_shape(self, tp_size: int, tp_rank: int) -> Tuple[int, ...]:
        """Shape of the shard TP rank ``tp_rank`` of ``tp_size`` holds."""
        if self.tp_dim is None:
            return self.shape
        rows = sum(stop - start for start, stop, _ in self.pieces(tp_size, tp_rank))
        return self.shape[:self.tp_dim] + (rows,) + self.shape[self.tp_dim + 1:]

    def shard(self, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
        """Cut TP rank ``tp_rank``'s shard from the ``full`` tensor (a new contiguous tensor)."""
        if self.tp_dim is None:
            return full.clone()
        parts = [full.narrow(self.tp_dim, start, stop - start)
                 for start, stop, _ in self.pieces(tp_size, tp_rank)]
        if not parts:
            return full.new_empty(self.local_shape(tp_size, tp_rank))
        return torch.cat(parts, dim=self.tp_dim).contiguous()


# ---- fused layouts ----------------------------------------------------------------------------
def qkv_blocks(num_heads: int, num_kv_heads: int, head_dim: int) -> Tuple[Block, ...]:
    """Fused QKV ``[Q; K; V]`` with grouped-query attention (GQA ratio ``num_heads/num_kv_heads``).

    Each sub-block is split by whole heads; K and V are replicated over TP ranks when there are
    fewer KV heads than ranks. Raises ConfigError unless ``num_kv_heads`` divides ``num_heads``.
    """
    for key, value in (("heads", num_heads), ("kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"fused qkv: {key} must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"fused qkv: kv_heads({num_kv_heads}) must divide heads({num_heads}) "
                          "(the GQA ratio is heads / kv_heads)")
    return (Block(num_heads * head_dim, head_dim, False, "q"),
            Block(num_kv_heads * head_dim, head_dim, True, "k"),
            Block(num_kv_heads * head_dim, head_dim, True, "v"))


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
            if spec.layer == EMBEDDING:
                embedding += spec.nbytes
            elif spec.layer == HEAD:
                head += spec.nbytes
            else:
                per_layer[spec.layer] += spec.nbytes
        return embedding, head, per_layer


# ---- building specs: YAML ---------------------------------------------------------------------
_TENSOR_KEYS = ("name", "shape", "dtype", "tp_dim", "layer", "fused")
_MODEL_KEYS = ("name", "num_layers", "dtype", "tensors", "synthetic")
_FUSED_KINDS = ("qkv", "parts")
LAYER_PLACEHOLDER = "{layer}"


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
            fused: {parts: [128, 128]}
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
        blocks = _fused_blocks(entry.get("fused"), f"{where}tensor {raw_name!r}: ")
        if LAYER_PLACEHOLDER in raw_name:
            if "layer" in entry:
                raise ConfigError(f"{where}tensor {raw_name!r}: a name with {{layer}} is repeated per "
                                  "layer; drop its 'layer:' key")
            if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
                raise ConfigError(f"{where}tensor {raw_name!r} uses {{layer}}: set num_layers (a positive "
                                  "integer) at the top of the spec")
            for layer in range(num_layers):
                tensors.append(TensorSpec.create(raw_name.replace(LAYER_PLACEHOLDER, str(layer)), shape,
                                                 entry.get("dtype", default_dtype), tp_dim, layer, blocks, where))
        else:
            if "layer" not in entry:
                raise ConfigError(f"{where}tensor {raw_name!r}: missing 'layer' (an index, 'embedding' "
                                  "or 'head'; or put {layer} in the name to repeat it per layer)")
            tensors.append(TensorSpec.create(raw_name, shape, entry.get("dtype", default_dtype), tp_dim,
                                             entry["layer"], blocks, where))
    return ModelSpec.create(tensors, num_layers, name, where)


def _fused_blocks(value: Any, at: str) -> Optional[Tuple[Block, ...]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{at}fused must be one of {{qkv: {{heads, kv_heads, head_dim}}}} or "
                          f"{{parts: [sizes]}}, got {value!r}")
    (kind, options), = value.items()
    if kind == "qkv":
        keys = ("heads", "kv_heads", "head_dim")
        if not isinstance(options, Mapping) or set(options) != set(keys):
            raise ConfigError(f"{at}fused.qkv needs exactly {allowed(keys)}, got {options!r}")
        try:
            return qkv_blocks(options["heads"], options["kv_heads"], options["head_dim"])
        except ConfigError as exc:
            raise ConfigError(f"{at}{exc}") from None
    if kind == "parts":
        if isinstance(options, Mapping):
            sizes, unit = options.get("sizes"), options.get("unit", 1)
        else:
            sizes, unit = options, 1
        if not isinstance(sizes, list) or not sizes or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ConfigError(f"{at}fused.parts must be a list of positive sizes, got {sizes!r}")
        if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
            raise ConfigError(f"{at}fused.parts.unit must be a positive integer, got {unit!r}")
        return parts_blocks(sizes, unit)
    raise ConfigError(f"{at}fused: unknown layout {kind!r}{did_you_mean(str(kind), _FUSED_KINDS)}; "
                      f"allowed: {allowed(_FUSED_KINDS)}")


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
               name: str = "llama-like") -> ModelSpec:
    """A Llama-style decoder with fused QKV (GQA) and fused gate/up, Megatron TP dims:
    embedding and head split by vocab, QKV and gate/up by output rows, o_proj and down_proj by
    input columns, norms replicated. The defaults are Llama-3-8B's shapes."""
    head_dim = hidden // heads
    qkv = qkv_blocks(heads, kv_heads, head_dim)
    specs = [TensorSpec.create("embed.weight", (vocab, hidden), dtype, 0, EMBEDDING)]
    for i in range(layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec.create(p + "input_norm.weight", (hidden,), dtype, None, i),
            TensorSpec.create(p + "attn.qkv.weight", (sum(b.size for b in qkv), hidden), dtype, 0, i, qkv),
            TensorSpec.create(p + "attn.o.weight", (hidden, heads * head_dim), dtype, 1, i),
            TensorSpec.create(p + "post_norm.weight", (hidden,), dtype, None, i),
            TensorSpec.create(p + "mlp.gate_up.weight", (2 * ffn, hidden), dtype, 0, i,
                              parts_blocks((ffn, ffn), 1, ("gate", "up"))),
            TensorSpec.create(p + "mlp.down.weight", (hidden, ffn), dtype, 1, i),
        ]
    specs += [TensorSpec.create("norm.weight", (hidden,), dtype, None, HEAD),
              TensorSpec.create("lm_head.weight", (vocab, hidden), dtype, 0, HEAD)]
    return ModelSpec.create(specs, layers, name)
