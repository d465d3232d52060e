"""A small GPT (pre-LayerNorm, learned positions, tied embeddings), nanoGPT-shaped.

``GPT.forward(idx, position_ids=None)`` takes optional position ids (default ``arange(seq)``), so a shard of a
longer sequence (context parallel) embeds its tokens at their global positions. Attention is causal
scaled-dot-product attention unless ``GPT.attention_fn`` is set: a callable ``(q, k, v, position_ids) -> out``
that every block calls instead (``ftrain.distributed.context_parallel.apply_context_parallel`` sets it to the
all-gather K/V attention over the mesh's ``cp`` group).

Example:
    >>> import torch
    >>> from ftrain.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32))
    >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 64])
    >>> x = torch.randint(0, 64, (2, 16))
    >>> torch.equal(model.eval()(x), model(x, position_ids=torch.arange(16)))
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``(q, k, v, position_ids) -> out``: q, k, v and out are ``(batch, heads, seq, head_dim)``; ``position_ids`` is
what the forward was given (``None`` when it was not)."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.1

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor | None = None, attention_fn: AttentionFn | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if attention_fn is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = attention_fn(q, k, v, position_ids)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-LayerNorm blocks, a final LayerNorm and the tied head.

    Attributes:
        config: the :class:`GPTConfig`.
        attention_fn: ``None`` (causal SDPA over the given sequence) or an :data:`AttentionFn` every block calls
            instead; a plain attribute, so it survives the meta-device skeleton copy of ``TrainState.create``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.attention_fn: AttentionFn | None = None
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of the token ids ``idx`` ``(batch, seq)``.

        Args:
            idx: token ids.
            position_ids: ``(seq,)`` or ``(batch, seq)`` position of each token (each below ``config.seq_len``);
                ``None`` means ``arange(seq)``. The default attention is causal in the order of ``idx`` whatever
                the ids say; an ``attention_fn`` receives them (context parallel masks with them).

        Raises:
            ValueError: the sequence is longer than ``config.seq_len``, or ``position_ids`` does not end in
                ``seq``.
        """
        t = idx.shape[1]
        if t > self.config.seq_len:
            raise ValueError(f"GPT: sequence length {t} exceeds the configured seq_len={self.config.seq_len}")
        if position_ids is None:
            pos = torch.arange(t, device=idx.device)
        elif position_ids.shape[-1] != t or position_ids.dim() not in (1, 2):
            raise ValueError(
                f"GPT: position_ids has shape {tuple(position_ids.shape)}; expected (seq,) or (batch, seq) with "
                f"seq={t}, the length of idx {tuple(idx.shape)}"
            )
        else:
            pos = position_ids
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x, position_ids, self.attention_fn)
        return self.lm_head(self.ln_f(x))
