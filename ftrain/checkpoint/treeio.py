"""A state pytree as named leaves and back: what a checkpoint stores, and the checks that guard a restore.

Every leaf is named by its key path, ``ftrain.tree.keystr(path)`` (``['params']['wte.weight']``,
``['opt_state'][1][0]['mu']['wte.weight']``), in the ``"ftrain"`` optree namespace with ``None`` kept as a leaf, so
optimizer states with empty nodes (``masked``) round-trip. A leaf is one of:

- ``tensor``: stored by the backend; ``meta.json`` records its dtype and (global) shape;
- ``none``: a ``None`` in the tree;
- ``python``: a JSON-able Python scalar (``int``, ``float``, ``bool``, ``str``), stored in ``meta.json``.

A restore takes a template, ``like``: its static parts (the model skeleton, ``tx``) and its tree structure are
reused, and every saved leaf is checked against the template's by path, kind, dtype and shape *before* any tensor
is read, with an error that names the paths that differ.

Example:
    >>> import torch
    >>> specs, tensors = flatten({"w": torch.ones(2, dtype=torch.bfloat16), "n": None, "lr": 0.1})
    >>> [(s.path, s.kind, s.dtype, s.shape) for s in specs]
    [("['lr']", 'python', None, None), ("['n']", 'none', None, None), ("['w']", 'tensor', 'bfloat16', (2,))]
    >>> rebuild({"w": torch.zeros(2, dtype=torch.bfloat16), "n": None, "lr": 0.0}, specs, tensors)["lr"]
    0.1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import optree
import torch

from ftrain import tree as _tree
from ftrain.checkpoint.errors import CheckpointMismatchError
from ftrain.state import Donated

__all__ = ["LeafSpec", "check_fits", "dtype_from_name", "dtype_name", "flatten", "is_dtensor", "rebuild"]

_PY_SCALARS = (bool, int, float, str)


def is_dtensor(x: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed when unused)."""
    return isinstance(x, torch.Tensor) and type(x).__name__ == "DTensor"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in checkpoint metadata")
    return dtype


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One leaf of a saved tree: its key path, kind (``tensor`` / ``none`` / ``python``), dtype and shape (tensors)
    or value (Python scalars)."""

    path: str
    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    value: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind}
        if self.kind == "tensor":
            out.update(dtype=self.dtype, shape=list(self.shape))
        elif self.kind == "python":
            out["value"] = self.value
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LeafSpec:
        shape = tuple(int(d) for d in doc["shape"]) if doc.get("shape") is not None else None
        return cls(str(doc["path"]), str(doc["kind"]), doc.get("dtype"), shape, doc.get("value"))

    def describe(self) -> str:
        if self.kind == "tensor":
            return f"{self.dtype} {self.shape}"
        return "None" if self.kind == "none" else f"{type(self.value).__name__} {self.value!r}"


def _leaf_spec(path: str, leaf: Any) -> LeafSpec:
    if isinstance(leaf, Donated):
        leaf._fail()  # raises: this state was donated to a step
    if leaf is None:
        return LeafSpec(path, "none")
    if isinstance(leaf, torch.Tensor):
        return LeafSpec(path, "tensor", dtype_name(leaf.dtype), tuple(leaf.shape))
    if isinstance(leaf, _PY_SCALARS):
        return LeafSpec(path, "python", value=leaf)
    raise TypeError(
        f"cannot checkpoint the leaf at {path}: a {type(leaf).__name__}. Leaves must be tensors, None, or int / "
        "float / bool / str; keep other objects out of the state (static fields like the skeleton and tx are "
        "not leaves), or pass JSON-able data through save(..., extra=...)."
    )


def _flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    paths, leaves, spec = optree.tree_flatten_with_path(tree, none_is_leaf=True, namespace=_tree.NAMESPACE)
    names = [_tree.keystr(p) for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"cannot checkpoint a tree with two leaves named alike: {dup[:5]}")
    return names, leaves, spec


def flatten(tree: Any) -> tuple[list[LeafSpec], dict[str, torch.Tensor]]:
    """The leaves of ``tree`` as :class:`LeafSpec` (tree order) and its tensors by path (detached, unchanged).

    Raises:
        TypeError: a leaf is neither a tensor, None nor a JSON-able scalar (names its path).
    """
    names, leaves, _ = _flatten_with_paths(tree)
    specs = [_leaf_spec(n, leaf) for n, leaf in zip(names, leaves)]
    tensors = {n: leaf.detach() for n, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)}
    return specs, tensors


def like_tensors(like: Any) -> dict[str, torch.Tensor]:
    """The template's tensors by path (targets for a backend's read: dtype, shape, device, DTensor placement)."""
    return flatten(like)[1]


def _mismatch(saved: LeafSpec, wanted: LeafSpec) -> bool:
    if saved.kind != wanted.kind:
        return True
    return saved.kind == "tensor" and (saved.dtype != wanted.dtype or saved.shape != wanted.shape)


def check_fits(saved: list[LeafSpec], like: Any, *, where: str) -> None:
    """Raises :class:`CheckpointMismatchError` unless every saved leaf matches ``like``'s by path, kind, dtype and
    shape (Python scalar values may differ: the saved one is restored)."""
    wanted = flatten(like)[0]
    saved_by_path = {s.path: s for s in saved}
    wanted_by_path = {w.path: w for w in wanted}
    only_saved = [s.path for s in saved if s.path not in wanted_by_path]
    only_like = [w.path for w in wanted if w.path not in saved_by_path]
    differ = [(saved_by_path[w.path], w) for w in wanted if w.path in saved_by_path]
    differ = [(s, w) for s, w in differ if _mismatch(s, w)]
    if not (only_saved or only_like or differ):
        return
    lines = [f"{where} does not fit the template `like` ({len(saved)} saved leaves, {len(wanted)} in like):"]
    if only_saved:
        lines.append(f"  only in the checkpoint: {', '.join(only_saved[:5])}" + (" ..." if len(only_saved) > 5 else ""))
    if only_like:
        lines.append(f"  only in like: {', '.join(only_like[:5])}" + (" ..." if len(only_like) > 5 else ""))
    for s, w in differ[:5]:
        lines.append(f"  {s.path}: {s.describe()} in the checkpoint, {w.describe()} in like")
    if len(differ) > 5:
        lines.append(f"  ... and {len(differ) - 5} more leaves differ")
    lines.append(
        "  Build `like` the way the saved state was built (same model config and dtype, same optimizer chain), or "
        "restore with like=None to get the saved tensors by key path."
    )
    raise CheckpointMismatchError("\n".join(lines))


def _place(loaded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if is_dtensor(target):
        if is_dtensor(loaded):
            return loaded
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(loaded.to(target.device_mesh.device_type), target.device_mesh, target.placements)
    return loaded if loaded.device == target.device else loaded.to(target.device)


def rebuild(like: Any, saved: list[LeafSpec], tensors: Mapping[str, torch.Tensor]) -> Any:
    """A tree shaped like ``like`` holding the saved leaves: ``tensors`` by path (moved to the template leaf's
    device, or distributed like a DTensor template), ``None`` and Python scalars from ``saved``. Call
    :func:`check_fits` first."""
    names, leaves, spec = _flatten_with_paths(like)
    saved_by_path = {s.path: s for s in saved}
    out = []
    for name, target in zip(names, leaves):
        s = saved_by_path[name]
        if s.kind == "tensor":
            out.append(_place(tensors[name], target))
        else:
            out.append(None if s.kind == "none" else s.value)
    return optree.tree_unflatten(spec, out)
