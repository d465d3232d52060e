"""Context parallel: the ``cp`` mesh axis splits the sequence dimension of every batch tensor.

Each cp rank holds ``seq_len / cp`` positions of every sequence. Three things must be done on the *global*
sequence, before it is split, for the sharded run to compute exactly the unsharded loss:

- **labels are shifted first** (``shift_labels``, transformers' convention: position ``t`` holds the label of
  token ``t + 1``, the last position ``-100``), so the loss must not shift again — a shard-local shift would drop
  the label at every shard boundary (:func:`lm_loss` uses ``shift_labels``);
- **position ids are global** (a shard's ``arange`` would restart at 0);
- **attention sees every key**: :func:`all_gather_kv_attention` all-gathers K and V over the cp group and masks
  with the global positions.

Turning it on (every rank runs the same script under ``torchrun``; ``ftrain.models.GPT``, or any model with an
``attention_fn`` hook)::

    config = ParallelConfig(dp_shard=1, cp=2)                 # or dp_shard=-1, cp=2 for FSDP x CP
    mesh = build_mesh(config)
    model = apply_context_parallel(GPT(gpt_config), mesh)     # attention all-gathers K/V over mesh["cp"]
    state = shard_state(TrainState.create(model, tx, key=0), mesh, config)
    step = make_train_step(lm_loss)                           # ftrain.jit(step) works too
    cp_rank, cp_size = mesh.get_local_rank("cp"), mesh["cp"].size()
    stream = BatchStream(..., rank=data_parallel_rank(mesh), world_size=data_parallel_size(mesh))
    for batch in ...:                                         # cp ranks read the same rows
        state, metrics = step(state, prepare_cp_batch(batch, cp_rank, cp_size))

The sharded step needs nothing else: the plan sums the loss ``(sum, count)`` and the gradients over the data
dims, ``cp`` included. Each rank's loss ``(sum, count)`` over its shard, summed over the cp ranks, is the
unsharded ``(sum, count)`` — the count exactly, the sum to rounding; the gradient of a rank's K/V shard comes back
through the all-gather's reduce-scatter, so parameter gradients summed over the cp ranks equal the unsharded ones
(tests/distributed/test_context_parallel.py, and 10 training steps equal to one process in
tests/distributed/test_cp_step.py).

With a causal mask, contiguous shards give the last rank ``cp`` times the attention work of the first. The
load-balanced order (``load_balance=True``, "head-tail" or zigzag) cuts the sequence into ``2 * cp`` chunks and
gives rank ``r`` chunks ``r`` and ``2 * cp - 1 - r``, so every rank has the same work; :func:`unshard_sequence`
undoes the order. The attention masks with the global positions, so either order gives the same numbers.

``torch.distributed.tensor.experimental.context_parallel`` (ring attention on SDPA) needs CUDA: on CPU/gloo with
torch 2.13 it fails with "aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding
strategy registered". The all-gather attention here runs anywhere, eager or compiled; it holds the full K and V
on every rank (memory ``O(seq_len)`` per rank for K/V, ``O(seq_len² / cp)`` for the scores). GPT's attention under
cp uses no padding mask (as without cp: causal attention, padded positions carry label -100).

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None]}
    >>> shard = prepare_cp_batch(batch, cp_rank=0, cp_size=2)
    >>> shard["input_ids"].tolist(), shard["shift_labels"].tolist(), shard["position_ids"].tolist()
    ([[0, 1, 6, 7]], [[1, 2, 7, -100]], [[0, 1, 6, 7]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ftrain.losses import Loss, cross_entropy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ContextParallelAttention",
    "all_gather_kv_attention",
    "apply_context_parallel",
    "cp_permutation",
    "cp_shard_indices",
    "lm_loss",
    "prepare_cp_batch",
    "shift_labels",
    "unshard_sequence",
]

_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "labels", "shift_labels")


def cp_permutation(
    seq_len: int, cp_size: int, *, load_balance: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions in the order the cp ranks hold them: rank ``r`` holds ``perm.view(cp_size, -1)[r]``.

    Args:
        seq_len: length of the global sequence.
        cp_size: number of context-parallel ranks.
        load_balance: head-tail order (rank ``r`` gets chunks ``r`` and ``2*cp_size-1-r`` of ``2*cp_size``);
            ``False`` gives contiguous shards.
        device: where the index tensor lives.

    Returns:
        An int64 permutation of ``range(seq_len)``.

    Raises:
        ValueError: ``seq_len`` is not a multiple of the number of chunks.

    Example:
        >>> cp_permutation(8, 2).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
        >>> cp_permutation(8, 2, load_balance=False).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"context parallel: cp_size must be an int >= 1, got {cp_size!r}")
    load_balance = load_balance and cp_size > 1  # one rank: nothing to balance, any length splits
    n_chunks = 2 * cp_size if load_balance else cp_size
    if seq_len % n_chunks:
        balanced = " (2 × cp with load_balance=True)" if load_balance else ""
        raise ValueError(
            f"context parallel: the sequence length {seq_len} is not a multiple of {n_chunks} chunks{balanced}. "
            f"Pad the batch to a multiple of {n_chunks} (e.g. pad_to_multiple_of in the collator, labels -100)."
        )
    chunks = torch.arange(seq_len, device=device).view(n_chunks, -1)
    if load_balance:
        order = [c for r in range(cp_size) for c in (r, n_chunks - 1 - r)]
        chunks = chunks[torch.tensor(order, device=device)]
    return chunks.reshape(-1)


def cp_shard_indices(
    seq_len: int, cp_rank: int, cp_size: int, *, load_balance: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """The global positions that cp rank ``cp_rank`` holds, in its local order (see :func:`cp_permutation`).

    Example:
        >>> cp_shard_indices(8, 1, 2).tolist()
        [2, 3, 4, 5]
    """
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context parallel: cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")
    return cp_permutation(seq_len, cp_size, load_balance=load_balance, device=device).view(cp_size, -1)[cp_rank]


def unshard_sequence(shards: list[torch.Tensor], *, seq_dim: int = 1, load_balance: bool = True) -> torch.Tensor:
    """Reassembles the global sequence from every cp rank's shard (rank order), undoing the load-balanced order.

    Args:
        shards: one tensor per cp rank, as :func:`prepare_cp_batch` (or a model run on its output) produced.
        seq_dim: the sequence dimension.
        load_balance: the order the shards were made with.

    Returns:
        The tensor in global sequence order.

    Example:
        >>> x = torch.arange(8)[None]
        >>> shards = [prepare_cp_batch({"input_ids": x}, r, 2)["input_ids"] for r in range(2)]
        >>> unshard_sequence(shards).tolist()
        [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    joined = torch.cat(list(shards), dim=seq_dim)
    perm = cp_permutation(joined.shape[seq_dim], len(shards), load_balance=load_balance, device=joined.device)
    return joined.index_select(seq_dim, torch.argsort(perm))


def shift_labels(labels: torch.Tensor, *, seq_dim: int = 1, ignore_index: int = -100) -> torch.Tensor:
    """``labels`` moved one position left along ``seq_dim``; the last position gets ``ignore_index``.

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7]])).tolist()
        [[6, 7, -100]]
    """
    length = labels.shape[seq_dim]
    pad_shape = list(labels.shape)
    pad_shape[seq_dim] = 1
    pad = torch.full(pad_shape, ignore_index, dtype=labels.dtype, device=labels.device)
    return torch.cat([labels.narrow(seq_dim, 1, length - 1), pad], dim=seq_dim)


def _sequence_length(batch: Mapping[str, Any], seq_dim: int) -> int:
    for key in _SEQUENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            if value.dim() <= seq_dim:
                raise ValueError(
                    f"prepare_cp_batch: batch[{key!r}] has shape {tuple(value.shape)}, no dimension seq_dim={seq_dim}"
                )
            return value.shape[seq_dim]
    raise ValueError(
        f"prepare_cp_batch: the batch has none of {list(_SEQUENCE_KEYS)} to take the sequence length from; "
        f"it has {sorted(batch)}."
    )


def prepare_cp_batch(
    batch: Mapping[str, Any],
    cp_rank: int,
    cp_size: int,
    *,
    seq_dim: int = 1,
    load_balance: bool = True,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """This cp rank's shard of a global batch, with labels shifted and position ids computed before splitting.

    ``labels`` is replaced by ``shift_labels`` (``labels`` shifted one position left on the global sequence, last
    position ``ignore_index``); a given ``shift_labels`` is kept and ``labels`` dropped, so a loss cannot shift a
    shard again (:func:`ftrain.step.causal_lm_loss` uses ``shift_labels`` when present). ``position_ids`` is added
    when missing (the global token index). Every tensor with the sequence length along ``seq_dim`` is split —
    ``attention_mask`` included; tensors with fewer dimensions (a per-example class label) are kept whole.

    Args:
        batch: the global batch (every cp rank passes the same one).
        cp_rank: this rank's index on the cp mesh axis.
        cp_size: the size of the cp axis.
        seq_dim: the sequence dimension of the batch tensors.
        load_balance: head-tail chunk order for causal attention (:func:`cp_permutation`).
        ignore_index: the label that does not count.

    Returns:
        A new dict; the input batch is not changed.

    Raises:
        ValueError: the sequence length does not split evenly, or a tensor has another size along ``seq_dim``.
    """
    length = _sequence_length(batch, seq_dim)
    index = cp_shard_indices(length, cp_rank, cp_size, load_balance=load_balance)
    out = dict(batch)
    labels = out.pop("labels", None)
    if "shift_labels" not in out and labels is not None:
        out["shift_labels"] = shift_labels(labels, seq_dim=seq_dim, ignore_index=ignore_index)
    if "position_ids" not in out:
        reference = next(out[k] for k in _SEQUENCE_KEYS if isinstance(out.get(k), torch.Tensor))
        out["position_ids"] = torch.arange(length, device=reference.device).expand(reference.shape[: seq_dim + 1])
    for key, value in out.items():
        if not isinstance(value, torch.Tensor) or value.dim() <= seq_dim:
            continue
        if value.shape[seq_dim] != length:
            raise ValueError(
                f"prepare_cp_batch: batch[{key!r}] has size {value.shape[seq_dim]} along seq_dim={seq_dim} but the "
                f"sequence length is {length}. Context parallel splits every sequence tensor along seq_dim; give "
                "this tensor the sequence layout (a 4-D attention mask: pass the 2-D padding mask instead) or "
                "take it out of the batch."
            )
        out[key] = value.index_select(seq_dim, index.to(value.device))
    return out


def _gather_autograd(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    # all_gather_single_autograd (newer torch) replaces all_gather_tensor_autograd (deprecated); the backward
    # of both is a reduce-scatter, which sums every rank's gradient for this rank's K/V shard.
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(x.contiguous(), gather_dim=dim, group=group)


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    # all_gather_single is the newer name of all_gather_tensor, where torch has it
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return gather(x.contiguous(), gather_dim=dim, group=group)


def all_gather_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any,
    positions: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries over every cp rank's keys: K and V are all-gathered (autograd-correct).

    The causal mask compares *global* positions, so it is right for any shard order (load-balanced or not). The
    backward of the gather is a reduce-scatter: each rank gets the gradient of the summed loss of all cp ranks for
    its K/V shard, so parameter gradients summed over the cp group equal the unsharded ones.

    Args:
        q, k, v: ``(batch, heads, local_seq, head_dim)`` for this rank's shard.
        group: the cp process group (a ``ProcessGroup``, a 1-D ``DeviceMesh`` or ``(mesh, dim)``).
        positions: ``(local_seq,)`` or ``(batch, local_seq)`` global token index of each local position
            (``cp_shard_indices``; not packed-sequence position ids that restart).
        key_padding_mask: ``(batch, local_seq)``, true/1 for real tokens; gathered like K. Each query always
            sees itself, so a padded row never has every key masked (which would give NaN).
        causal: mask keys after the query.
        scale: softmax scale (default ``head_dim ** -0.5``).

    Returns:
        ``(batch, heads, local_seq, head_dim)`` attention output for the local queries.

    Raises:
        ValueError: shapes that do not fit.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(
            "all_gather_kv_attention: expected q, k, v of shape (batch, heads, local_seq, head_dim) with the same "
            f"local_seq, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if positions.shape[-1] != q.shape[2]:
        raise ValueError(
            f"all_gather_kv_attention: positions {tuple(positions.shape)} must end in local_seq={q.shape[2]}"
        )
    k_all = _gather_autograd(k, 2, group)
    v_all = _gather_autograd(v, 2, group)
    key_pos = _gather(positions, positions.dim() - 1, group)
    q_pos, key_pos = positions[..., :, None], key_pos[..., None, :]  # (…, Tq, 1), (…, 1, Tk)
    allowed = key_pos <= q_pos if causal else torch.ones_like(key_pos <= q_pos)
    if key_padding_mask is not None:
        # gathered as int32 and compared after: a bool tensor through the collective tripped Inductor's CPU
        # codegen (torch 2.13, fullgraph compile)
        keep = (_gather(key_padding_mask.to(torch.int32), 1, group) != 0)[:, None, :]  # (batch, 1, Tk)
        allowed = (allowed & keep) | (key_pos == q_pos)
    if allowed.dim() == 3:  # per-example mask: add the heads dimension
        allowed = allowed[:, None]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed, scale=scale)


class ContextParallelAttention:
    """An attention hook (``ftrain.models.GPT.attention_fn``): :func:`all_gather_kv_attention` over ``group``,
    causal on the global ``position_ids`` the model was called with.

    A deep copy (``TrainState.create`` copies the model into a meta-device skeleton) shares the group: a process
    group is a handle, not data.

    Args:
        group: the cp process group: a 1-D ``DeviceMesh`` (``mesh["cp"]``), a ``ProcessGroup`` or ``(mesh, dim)``.

    Example:
        >>> attend = ContextParallelAttention(group=None)
        >>> q = torch.zeros(1, 2, 4, 8)
        >>> attend(q, q, q, None)
        Traceback (most recent call last):
        ...
        ValueError: context parallel attention: the model was called without position_ids. Each cp rank holds a shard of the sequence, so the causal mask needs every token's global position: pass the batch through prepare_cp_batch (which adds position_ids) and call the model with position_ids=batch["position_ids"] (lm_loss does).
    """  # noqa: E501

    def __init__(self, group: Any):
        self.group = group

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        if position_ids is None:
            raise ValueError(
                "context parallel attention: the model was called without position_ids. Each cp rank holds a shard "
                "of the sequence, so the causal mask needs every token's global position: pass the batch through "
                "prepare_cp_batch (which adds position_ids) and call the model with "
                'position_ids=batch["position_ids"] (lm_loss does).'
            )
        return all_gather_kv_attention(q, k, v, group=self.group, positions=position_ids)

    def __deepcopy__(self, memo: dict) -> ContextParallelAttention:
        return self

    def __repr__(self) -> str:
        return f"ContextParallelAttention(group={self.group!r})"


def apply_context_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Makes ``model``'s attention context-parallel over ``mesh["cp"]``, in place; returns ``model``.

    Every submodule with an ``attention_fn`` attribute (``ftrain.models.GPT``) gets a
    :class:`ContextParallelAttention` over the cp sub-mesh; with ``cp == 1`` the hook is reset to ``None`` (the
    model's own attention), so one script serves every layout. Works on a model before
    ``TrainState.create`` or on a state's meta-device skeleton: it touches no tensor. The batches must then come
    through :func:`prepare_cp_batch` and the model be called with their ``position_ids`` (:func:`lm_loss`).

    Args:
        model: the model or skeleton.
        mesh: from :func:`ftrain.distributed.build_mesh` (it has a ``cp`` dim, size 1 included).

    Returns:
        ``model``, changed.

    Raises:
        ValueError: no submodule has an ``attention_fn`` hook, or the mesh has no ``cp`` dim.

    Example:
        >>> apply_context_parallel(nn.Linear(2, 2), mesh=None)
        Traceback (most recent call last):
        ...
        ValueError: apply_context_parallel: Linear has no module with an attention_fn attribute, so its attention cannot be made context-parallel. ftrain.models.GPT has one; for another model, give the module that computes attention an attention_fn (q, k, v, position_ids) -> out hook (ftrain.models.gpt.AttentionFn).
    """  # noqa: E501
    hooked = [m for m in model.modules() if "attention_fn" in vars(m)]
    if not hooked:
        raise ValueError(
            f"apply_context_parallel: {type(model).__name__} has no module with an attention_fn attribute, so its "
            "attention cannot be made context-parallel. ftrain.models.GPT has one; for another model, give the "
            "module that computes attention an attention_fn (q, k, v, position_ids) -> out hook "
            "(ftrain.models.gpt.AttentionFn)."
        )
    dims = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "cp" not in dims:
        raise ValueError(
            f"apply_context_parallel: the mesh has dims {dims}, none named 'cp'. Build it with "
            "ftrain.distributed.build_mesh(ParallelConfig(cp=...))."
        )
    cp_mesh = mesh["cp"]
    attention = ContextParallelAttention(cp_mesh) if cp_mesh.size() > 1 else None
    for module in hooked:
        module.attention_fn = attention
    return model


def lm_loss(model: Any, batch: Mapping[str, Any]) -> Loss:
    """Next-token cross-entropy of a model called as ``model(input_ids, position_ids=...)`` (``ftrain.models.GPT``),
    for context-parallel batches and plain ones alike.

    A batch from :func:`prepare_cp_batch` holds ``shift_labels`` (shifted on the global sequence) and is scored
    without a second shift; a plain batch's ``labels`` are shifted here. ``position_ids`` is passed when the batch
    has it.

    Args:
        model: the (bound) model; returns logits ``(batch, seq, vocab)`` or an output with ``.logits``.
        batch: ``input_ids`` and ``shift_labels`` or ``labels``; optionally ``position_ids``.

    Returns:
        ``Loss(sum, count)`` over the labels that are not ``-100``.

    Raises:
        KeyError: the batch has neither ``shift_labels`` nor ``labels``.

    Example:
        >>> from ftrain.models import GPT, GPTConfig
        >>> gpt = GPT(GPTConfig(vocab_size=16, seq_len=8, n_layer=1, n_head=1, d_model=8, dropout=0.0))
        >>> batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None]}
        >>> shards = [prepare_cp_batch(batch, r, 2) for r in range(2)]
        >>> int(lm_loss(gpt, batch).count), [int(lm_loss(gpt, s).count) for s in shards]
        (7, [3, 4])
    """
    if "shift_labels" not in batch and "labels" not in batch:
        raise KeyError(
            f"lm_loss: the batch has neither 'shift_labels' nor 'labels' (keys: {sorted(batch)}). Give it labels "
            "(the collator builds them), or shift_labels via prepare_cp_batch."
        )
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    out = model(batch["input_ids"], **extra)
    logits = getattr(out, "logits", out)
    if "shift_labels" in batch:
        return cross_entropy(logits, batch["shift_labels"])
    return cross_entropy(logits, batch["labels"], shift=True)
