"""A small llama-like model in plain torch, for the weight-parallel (ISP) tests and benchmark.

Embedding, RMSNorm, rotary attention with GQA (optional q/k/v bias, as Qwen), SwiGLU MLP and
a head; ``model.layers`` are the blocks. ``attn_core`` swaps the local attention for a
distributed one (``UlyssesAttention(local_attention, "tensor")``); ``positions`` lets a rank
that holds a slice of the sequence rotate by the global positions.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@attrs.frozen
class TinyConfig:
    vocab: int = 32
    dim: int = 24
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 38          # not divisible by 4: uneven shards over a weight group of 4
    layers: int = 3
    qkv_bias: bool = True
    tie: bool = False      # the head uses the embedding's table

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on ``[b, s, h, d]`` tensors; KV heads repeated to the query heads."""
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``[b, s, h, d]`` by ``positions`` ``[s]``."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[None, :, None, :].to(x.dtype), angles.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig, attn_core: Optional[Callable] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.core = attn_core or local_attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = rotate(self.wq(x).view(b, s, self.cfg.heads, self.cfg.head_dim), positions)
        k = rotate(self.wk(x).view(b, s, self.cfg.kv_heads, self.cfg.head_dim), positions)
        v = self.wv(x).view(b, s, self.cfg.kv_heads, self.cfg.head_dim)
        return self.wo(self.core(q, k, v).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig, attn_core: Optional[Callable] = None) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), Attention(cfg, attn_core)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim), MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyConfig, seed: int = 0, attn_core: Optional[Callable] = None,
                 checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        torch.manual_seed(seed)
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attn_core) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(tokens.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            if self.checkpoint:  # activation checkpointing: recompute each block in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, positions, use_reentrant=False)
            else:
                x = layer(x, positions)
        return self.head(self.norm(x))


def batch(seed: int, cfg: TinyConfig, samples: int, seq: int):
    """Tokens and next-token targets ``[samples, seq]``, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (samples, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def train_unsharded(cfg: TinyConfig, steps: int, batch_of: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
                    micro_rows: Sequence[List[int]], divide: int, lr: float
                    ) -> Tuple[List[float], Dict[str, torch.Tensor]]:
    """The single-process reference: ``steps`` AdamW steps (weight decay 0.1) of the unsharded
    model (seed 7); each step's batch is ``batch_of(step)``, its micro-batches the rows in
    ``micro_rows``, each loss divided by ``divide``. Returns the losses and the final state."""
    model = TinyLlama(cfg, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for step in range(steps):
        tokens, targets = batch_of(step)
        total = 0.0
        for rows in micro_rows:
            loss = loss_of(model(tokens[rows]), targets[rows]) / divide
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
