"""``update_and_apply``: one optimizer step, ``tx.update`` then ``apply_updates``, as fused passes where it can.

``tx.update`` and ``apply_updates`` are pure and out of place: every ``torch._foreach_*`` op allocates a new list
of tensors (about fifteen copies of the parameter set per AdamW step). A train step only needs the new parameters
and the new optimizer state, so it calls :func:`update_and_apply`, which recognises the common optimizers from
what their factories recorded (:func:`ftrain.optim.base.description`) and runs each as one in-place pass over
buffers of its own:

- ``adam`` / ``adamw`` (weight-decay mask included): ``torch._fused_adam_`` / ``torch._fused_adamw_``;
- ``sgd`` (momentum, Nesterov, dampening, weight decay): ``torch._fused_sgd_``;
- ``adagrad``: ``torch._fused_adagrad_`` (CPU);
- ``rmsprop``, ``lion``, ``adafactor``: in-place ``torch._foreach_*_`` sequences (no fused kernel exists);
- around them: a ``clip_by_global_norm`` at the head (reusing the step's ``grad_norm``), schedules, nested
  ``chain`` / ``named_chain``, ``partition`` (the decay groups of :func:`ftrain.optim.make_optimizer`) and
  ``inject_hyperparams``.

The result is the generic route's: the same new state tree in every field (counts, recorded learning rates,
moments, hyper-parameters), numbers equal up to rounding. ``donate=False`` computes into new buffers (the state is
cloned, then updated in place), so the inputs are untouched; ``donate=True`` updates the given tensors in place.
Anything not recognised, a compiled step (``torch.compiler.is_compiling()``: the compiled graph stays the generic
one), and tensors that are not plain float32/float64 CPU or CUDA tensors take the generic route;
:func:`route_of` says which route a call takes and why.

Hyper-parameters held as 0-d tensors (``inject_hyperparams``, a tensor ``learning_rate``) reach the kernels as
Python numbers: on the CPU their values are read (``.item()``, no device to wait for); on CUDA only the learning
rate may stay a tensor (float32 parameters), any other tensor hyper-parameter takes the generic route rather than
wait for the device. Adagrad's fused route is used on the CPU only.

Example:
    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> new_params, new_state = update_and_apply(tx, {"w": torch.ones(2)}, tx.init(params), params)
    >>> new_params["w"], params["w"]  # the inputs are untouched
    (tensor([0.9000, 0.9000]), tensor([1., 1.]))
    >>> route_of(tx, {"w": torch.ones(2)}, tx.init(params), params)
    'fused: sgd'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ftrain import tree as _tree
from ftrain.optim.base import Description, GradientTransformation, OptState, Params, Updates, description
from ftrain.optim.combine import PartitionState, _labels
from ftrain.optim.factorized import ScaleByAdafactorState, _rms_list, _step_size
from ftrain.optim.transform import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByLionState,
    ScaleByRmsState,
    TraceState,
    _flatten_keep_none,
    _is_number,
    _is_zero,
    _lr_value,
    _on,
    _resolve_mask,
    _scalar_dtype,
)
from ftrain.optim.update import apply_updates, apply_updates_
from ftrain.optim.wrappers import InjectHyperparamsState, _cast

__all__ = ["route_of", "update_and_apply"]

_FLOATS = (torch.float32, torch.float64)


class _NotFusable(Exception):
    """Raised while planning: the generic route runs instead; the message says why (see :func:`route_of`)."""


def _copy_state_into(old: OptState, new: OptState) -> OptState:
    """Writes ``new``'s tensors into ``old``'s (same structure) and returns ``old``."""
    olds, news = _tree.tree_leaves(old), _tree.tree_leaves(new)
    pairs = [(o, n) for o, n in zip(olds, news) if isinstance(o, torch.Tensor) and o is not n]
    if pairs:
        with torch.no_grad():
            torch._foreach_copy_([o for o, _ in pairs], [n for _, n in pairs])
    return old


# ----------------------------------------------------------------------------------------------------------
# What a plan sees (the flat leaves) and what it runs on (its own buffers).


@dataclasses.dataclass
class _Env:
    """The call's flat leaves, for planning. Positions (``idx``) index ``params`` / ``grads``."""

    spec: Any  # the params' treespec, None kept as a leaf
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    grad_norm: torch.Tensor | None
    device: torch.device

    def subtree(self, idx: list[int]) -> Params:
        """The params tree with ``None`` outside ``idx``: what a transformation inside ``partition`` sees."""
        keep = set(idx)
        return self.spec.unflatten([p if i in keep else None for i, p in enumerate(self.params)])


@dataclasses.dataclass
class _Work:
    """The buffers a plan updates in place: the caller's (donated) or copies of them."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    grads_owned: list[bool]
    donate: bool

    def own(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """State tensors the kernels may update in place: these ones when donated, else copies."""
        return tensors if self.donate else [t.clone() for t in tensors]

    def scale_grads(self, idx: list[int], factor: torch.Tensor) -> None:
        """``grads[i] *= factor`` for ``i`` in ``idx``, in place on buffers it owns, into new ones otherwise."""
        mine = [i for i in idx if self.grads_owned[i]]
        theirs = [i for i in idx if not self.grads_owned[i]]
        if mine:
            torch._foreach_mul_([self.grads[i] for i in mine], factor)
        if theirs:
            for i, g in zip(theirs, torch._foreach_mul([self.grads[i] for i in theirs], factor)):
                self.grads[i], self.grads_owned[i] = g, True

    def take(self, idx: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(params, grads)`` at ``idx``."""
        return [self.params[i] for i in idx], [self.grads[i] for i in idx]


class _Plan(NamedTuple):
    """``run(work)`` updates ``work.params`` and returns the transformation's new state; ``name`` for route_of."""

    name: str
    run: Callable[[_Work], Any]


class _Link(NamedTuple):
    """One transformation of a (flattened) chain, with its description and its state."""

    tx: GradientTransformation
    d: Description
    state: Any


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters and state leaves, checked while planning.


def _number(x: Any, what: str) -> float:
    """A hyper-parameter as the Python number the kernels take. A CPU 0-d tensor is read (no device to wait for)."""
    if _is_number(x):
        return float(x)
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.device.type == "cpu":
        return x.item()
    raise _NotFusable(f"{what} is a tensor on {getattr(x, 'device', '?')}: reading it would wait for the device")


def _rate(x: Any, env: _Env, what: str) -> float | torch.Tensor:
    """A learning rate for the kernels: a number, or a 0-d float32 tensor on the params' CUDA device (what
    ``tensor_lr`` kernels read on the device, float32 only)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        if x.dtype != torch.float32 or any(p.dtype != torch.float32 for p in env.params):
            raise _NotFusable(f"{what} is a CUDA tensor and the kernels read it as float32 (parameters are not)")
        return x.to(env.device)
    return _number(x, what)


def _state_list(tree: Any, idx: list[int], env: _Env, what: str) -> tuple[list[torch.Tensor], Any]:
    """A state tree's tensors (one per leaf in ``idx``, checked against the params) and its treespec."""
    leaves, spec = _tree.tree_flatten(tree)
    if len(leaves) != len(idx):
        raise _NotFusable(f"{what} has {len(leaves)} tensors for {len(idx)} parameters")
    for x, i in zip(leaves, idx):
        p = env.params[i]
        if type(x) is not torch.Tensor or x.shape != p.shape or x.dtype != p.dtype or not x.is_contiguous():
            raise _NotFusable(f"{what} does not match its parameter (shape, dtype, contiguity)")
    return leaves, spec


def _typed_state(state: Any, cls: type, what: str) -> Any:
    if not isinstance(state, cls):
        raise _NotFusable(f"{what}'s state is a {type(state).__name__}, not a {cls.__name__}")
    return state


def _by_dtype(positions: list[int], tensors: list[torch.Tensor]) -> list[list[int]]:
    """``positions`` split by the dtype of ``tensors[position]`` (a fused kernel takes one dtype per call)."""
    groups: dict[torch.dtype, list[int]] = {}
    for j in positions:
        groups.setdefault(tensors[j].dtype, []).append(j)
    return list(groups.values())


def _at(xs: list[Any], js: list[int]) -> list[Any]:
    return [xs[j] for j in js]


def _learning_rate(link: _Link, env: _Env) -> tuple[float | torch.Tensor, Callable[[], ScaleByLearningRateState]]:
    """The kernels' learning rate and the new ``ScaleByLearningRateState``, as ``scale_by_learning_rate`` records."""
    hp, st = link.d.hparams, _typed_state(link.state, ScaleByLearningRateState, "scale_by_learning_rate")
    if not hp["flip_sign"]:
        raise _NotFusable("scale_by_learning_rate(flip_sign=False) ascends; the kernels descend")
    learning_rate = hp["learning_rate"]
    if _is_number(learning_rate):
        lr_t, rate = st.learning_rate, float(learning_rate)
    else:
        lr_t = _lr_value(learning_rate, st.count, st.learning_rate)
        rate = _rate(lr_t, env, "the learning rate")
    return rate, lambda: ScaleByLearningRateState(st.count + 1, lr_t)


def _decay(link: _Link | None, idx: list[int], env: _Env) -> list[tuple[list[int], float]]:
    """``add_decayed_weights``' coefficient per group of positions (``0.0`` where its mask says no)."""
    everything = list(range(len(idx)))
    if link is None:
        return [(everything, 0.0)]
    wd = _number(link.d.hparams["weight_decay"], "add_decayed_weights' weight_decay")
    mask = link.d.hparams["mask"]
    if mask is None:
        return [(everything, wd)]
    keep = _resolve_mask(mask, env.subtree(idx), env.spec, where="add_decayed_weights")
    flags = [keep[i] for i in idx]
    groups = [([j for j in everything if flags[j]], wd), ([j for j in everything if not flags[j]], 0.0)]
    return [(js, w) for js, w in groups if js]


def _sub_scaled_(params: list[torch.Tensor], xs: list[torch.Tensor], rate: float | torch.Tensor) -> None:
    """``params -= rate * xs`` in place."""
    if isinstance(rate, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(xs, rate))
    else:
        torch._foreach_add_(params, xs, alpha=-rate)


# ----------------------------------------------------------------------------------------------------------
# Families: a chain of recognised links, written one letter per link, lowered to kernels.

_LETTERS = {
    "add_decayed_weights": "W",
    "scale_by_adam": "A",
    "scale_by_learning_rate": "L",
    "trace": "T",
    "scale_by_adagrad": "G",
    "scale_by_rms": "R",
    "scale_by_lion": "N",
    "adafactor": "F",
    "set_to_zero": "Z",
}


def _plan_adam(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``[W] A [W] L``: torch's fused Adam (weight decay before ``A``: Adam's L2) or AdamW (after: decoupled)."""
    a, decays = code.index("A"), [k for k, c in enumerate(code) if c == "W"]
    if len(decays) > 1:
        raise _NotFusable("weight decay both before and after scale_by_adam")
    adam, hp = links[a], links[a].d.hparams
    if hp["nesterov"] or _number(hp["eps_root"], "scale_by_adam's eps_root") != 0:
        raise _NotFusable("scale_by_adam with nesterov=True or eps_root != 0 has no fused kernel")
    b1, b2, eps = (_number(hp[k], f"scale_by_adam's {k}") for k in ("b1", "b2", "eps"))
    st = _typed_state(adam.state, ScaleByAdamState, "scale_by_adam")
    mu, mu_spec = _state_list(st.mu, idx, env, "scale_by_adam's mu")
    nu, nu_spec = _state_list(st.nu, idx, env, "scale_by_adam's nu")
    rate, lr_state = _learning_rate(links[code.index("L")], env)
    groups = _decay(links[decays[0]] if decays else None, idx, env)
    kernel = torch._fused_adamw_ if decays and decays[0] > a else torch._fused_adam_

    def run(work: _Work) -> list[Any]:
        count = st.count + 1
        steps = count.to(torch.float32)
        params, grads = work.take(idx)
        mu_w, nu_w = work.own(mu), work.own(nu)
        for js, wd in groups:
            for ks in _by_dtype(js, params):
                lists = [_at(xs, ks) for xs in (params, grads, mu_w, nu_w)]
                kernel(*lists, [], [steps] * len(ks), lr=rate, beta1=b1, beta2=b2, weight_decay=wd, eps=eps,
                       amsgrad=False, maximize=False)  # fmt: skip
        new = [link.state for link in links]
        new[a] = ScaleByAdamState(count, _tree.tree_unflatten(mu_spec, mu_w), _tree.tree_unflatten(nu_spec, nu_w))
        new[code.index("L")] = lr_state()
        return new

    return _Plan("adamw" if kernel is torch._fused_adamw_ else "adam", run)


def _plan_sgd(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``[W] [T] L``: torch's fused SGD (weight decay, momentum, Nesterov, dampening)."""
    momentum, nesterov, dampening, first, bufs, spec = 0.0, False, 0.0, False, [], None
    t = code.find("T")
    if t >= 0:
        hp, st = links[t].d.hparams, _typed_state(links[t].state, TraceState, "trace")
        momentum, nesterov = _number(hp["decay"], "trace's decay"), hp["nesterov"]
        if momentum == 0:
            raise _NotFusable("trace with a zero decay keeps a buffer the fused kernel would not update")
        dampening = _number(hp["dampening"], "trace's dampening")
        if dampening != 0:  # the first step is not dampened: which step is it?
            first = bool(_number(st.count, "trace's count (needed with dampening)") == 0)
        bufs, spec = _state_list(st.trace, idx, env, "trace's buffer")
    rate, lr_state = _learning_rate(links[code.index("L")], env)
    groups = _decay(links[0] if code.startswith("W") else None, idx, env)

    def run(work: _Work) -> list[Any]:
        params, grads = work.take(idx)
        bufs_w = work.own(bufs)
        for js, wd in groups:
            for ks in _by_dtype(js, params):
                torch._fused_sgd_(_at(params, ks), _at(grads, ks), _at(bufs_w, ks) if bufs_w else [],
                                  weight_decay=wd, momentum=momentum, lr=rate, dampening=dampening,
                                  nesterov=nesterov, maximize=False, is_first_step=first)  # fmt: skip
        new = [link.state for link in links]
        if t >= 0:
            new[t] = TraceState(links[t].state.count + 1, _tree.tree_unflatten(spec, bufs_w))
        new[code.index("L")] = lr_state()
        return new

    return _Plan("sgd", run)


def _plan_adagrad(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``[W] G L``: torch's fused Adagrad (the CPU kernel)."""
    if env.device.type != "cpu":
        raise _NotFusable("the fused Adagrad route runs on the CPU only")
    g = code.index("G")
    hp, st = links[g].d.hparams, _typed_state(links[g].state, ScaleByAdagradState, "scale_by_adagrad")
    eps, lr_decay = _number(hp["eps"], "scale_by_adagrad's eps"), _number(hp["lr_decay"], "its lr_decay")
    sums, spec = _state_list(st.sum_of_squares, idx, env, "scale_by_adagrad's sum_of_squares")
    rate, lr_state = _learning_rate(links[code.index("L")], env)
    groups = _decay(links[0] if code.startswith("W") else None, idx, env)

    def run(work: _Work) -> list[Any]:
        count = st.count + 1
        params, grads = work.take(idx)
        sums_w = work.own(sums)
        for js, wd in groups:
            for ks in _by_dtype(js, params):
                torch._fused_adagrad_(_at(params, ks), _at(grads, ks), _at(sums_w, ks), [count] * len(ks), lr=rate,
                                      lr_decay=lr_decay, weight_decay=wd, eps=eps, maximize=False)  # fmt: skip
        new = [link.state for link in links]
        new[g] = ScaleByAdagradState(count, _tree.tree_unflatten(spec, sums_w))
        new[code.index("L")] = lr_state()
        return new

    return _Plan("adagrad", run)


def _with_decay(params: list[torch.Tensor], grads: list[torch.Tensor], groups: list[tuple[list[int], float]]) -> list:
    """``grads + wd * params`` (new tensors where ``wd != 0``), as ``add_decayed_weights`` before the scaling."""
    out = list(grads)
    for js, wd in groups:
        if wd != 0:
            for j, x in zip(js, torch._foreach_add(_at(grads, js), _at(params, js), alpha=wd)):
                out[j] = x
    return out


def _plan_rmsprop(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``[W] R [T] L``: torch's ``_multi_tensor_rmsprop`` sequence, in place on the step's buffers."""
    r, t = code.index("R"), code.find("T")
    hp, st = links[r].d.hparams, _typed_state(links[r].state, ScaleByRmsState, "scale_by_rms")
    alpha, eps = _number(hp["decay"], "scale_by_rms' decay"), _number(hp["eps"], "scale_by_rms' eps")
    nu, nu_spec = _state_list(st.nu, idx, env, "scale_by_rms' nu")
    mu, mu_spec = _state_list(st.mu, idx, env, "scale_by_rms' mu") if hp["centered"] else ([], None)
    momentum, bufs, buf_spec = 0.0, [], None
    if t >= 0:
        thp, tst = links[t].d.hparams, _typed_state(links[t].state, TraceState, "trace")
        if thp["nesterov"] or _number(thp["dampening"], "trace's dampening") != 0:
            raise _NotFusable("RMSprop's momentum has no Nesterov or dampening")
        momentum = _number(thp["decay"], "trace's decay")
        bufs, buf_spec = _state_list(tst.trace, idx, env, "trace's buffer")
    rate, lr_state = _learning_rate(links[code.index("L")], env)
    groups = _decay(links[0] if code.startswith("W") else None, idx, env)

    def run(work: _Work) -> list[Any]:
        params, grads = work.take(idx)
        grads = _with_decay(params, grads, groups)
        nu_w, mu_w, bufs_w = work.own(nu), work.own(mu), work.own(bufs)
        torch._foreach_mul_(nu_w, alpha)
        torch._foreach_addcmul_(nu_w, grads, grads, value=1 - alpha)
        if mu_w:
            torch._foreach_lerp_(mu_w, grads, 1 - alpha)
            avg = torch._foreach_addcmul(nu_w, mu_w, mu_w, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(nu_w)
        torch._foreach_add_(avg, eps)
        if bufs_w:
            torch._foreach_mul_(bufs_w, momentum)
            torch._foreach_addcdiv_(bufs_w, grads, avg)
            _sub_scaled_(params, bufs_w, rate)
        elif isinstance(rate, torch.Tensor):
            torch._foreach_reciprocal_(avg)
            torch._foreach_mul_(avg, grads)
            _sub_scaled_(params, avg, rate)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-rate)
        new = [link.state for link in links]
        new_mu = _tree.tree_unflatten(mu_spec, mu_w) if mu_w else None
        new[r] = ScaleByRmsState(_tree.tree_unflatten(nu_spec, nu_w), new_mu)
        if t >= 0:
            new[t] = TraceState(links[t].state.count + 1, _tree.tree_unflatten(buf_spec, bufs_w))
        new[code.index("L")] = lr_state()
        return new

    return _Plan("rmsprop", run)


def _plan_lion(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``N [W] L``: Lion in place (no torch kernel exists): ``c = sign(lerp(mu, g, 1 - b1))``, decoupled decay,
    ``p -= lr * c``, then ``mu = lerp(mu, g, 1 - b2)``."""
    hp, st = links[0].d.hparams, _typed_state(links[0].state, ScaleByLionState, "scale_by_lion")
    b1, b2 = _number(hp["b1"], "scale_by_lion's b1"), _number(hp["b2"], "scale_by_lion's b2")
    mu, spec = _state_list(st.mu, idx, env, "scale_by_lion's mu")
    rate, lr_state = _learning_rate(links[code.index("L")], env)
    groups = _decay(links[1] if code[1] == "W" else None, idx, env)

    def run(work: _Work) -> list[Any]:
        params, grads = work.take(idx)
        mu_w = work.own(mu)
        direction = torch._foreach_lerp(mu_w, grads, 1 - b1)
        torch._foreach_sign_(direction)
        for js, wd in groups:
            if wd != 0:
                torch._foreach_add_(_at(direction, js), _at(params, js), alpha=wd)
        _sub_scaled_(params, direction, rate)
        torch._foreach_lerp_(mu_w, grads, 1 - b2)
        new = [link.state for link in links]
        new[0] = ScaleByLionState(_tree.tree_unflatten(spec, mu_w))
        new[code.index("L")] = lr_state()
        return new

    return _Plan("lion", run)


def _plan_zero(links: list[_Link], code: str, idx: list[int], env: _Env) -> _Plan:
    """``Z``: ``set_to_zero`` (a frozen group of ``partition``): the params stay as they are."""
    return _Plan("set_to_zero", lambda work: [link.state for link in links])


_FAMILIES: list[tuple[re.Pattern[str], Callable[..., _Plan]]] = [
    (re.compile("W?AW?L"), _plan_adam),
    (re.compile("W?T?L"), _plan_sgd),
    (re.compile("W?GL"), _plan_adagrad),
    (re.compile("W?RT?L"), _plan_rmsprop),
    (re.compile("NW?L"), _plan_lion),
    (re.compile("F"), lambda links, code, idx, env: _plan_adafactor(links[0], idx, env)),
    (re.compile("Z"), _plan_zero),
]


# ----------------------------------------------------------------------------------------------------------
# Adafactor (HF's, as ftrain.optim.factorized computes it), in place.


def _adafactor_moments(
    grads: list[torch.Tensor], stats: tuple[list, list, list], beta2t: torch.Tensor, eps1: Any
) -> list[torch.Tensor]:
    """Updates the row / column / full second moments in place; returns ``grad / sqrt(v_hat)`` (new buffers)."""
    rows, cols, fulls = stats
    sq = torch._foreach_mul(grads, grads)
    torch._foreach_add_(sq, eps1)
    fac = [j for j, x in enumerate(rows) if x is not None]
    unf = [j for j, x in enumerate(rows) if x is None]
    keep = 1 - beta2t
    for olds, news in (
        (_at(rows, fac), [sq[j].mean(dim=-1) for j in fac]),
        (_at(cols, fac), [sq[j].mean(dim=-2) for j in fac]),
        (_at(fulls, unf), _at(sq, unf)),
    ):
        if olds:  # HF's order of operations: old * beta2t + new * (1 - beta2t)
            torch._foreach_mul_(olds, beta2t)
            torch._foreach_add_(olds, torch._foreach_mul(news, keep))
    for j, g in enumerate(grads):  # sq[j] is not read again: it becomes the preconditioned gradient
        if rows[j] is not None:
            r_factor = (rows[j] / rows[j].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            torch.mul(r_factor, cols[j].unsqueeze(-2).rsqrt(), out=sq[j])
        else:
            torch.rsqrt(fulls[j], out=sq[j])
        sq[j].mul_(g)
    return sq


def _plan_adafactor(link: _Link, idx: list[int], env: _Env) -> _Plan:
    """``adafactor``: the moments in place, then ``p -= update`` (HF's Adafactor step, as ``factorized.py``)."""
    inner = description(link.d.children[0])
    if inner is None or inner.kind != "scale_by_adafactor":
        raise _NotFusable("adafactor without its scale_by_adafactor")
    hp, st = inner.hparams, _typed_state(link.state, ScaleByAdafactorState, "adafactor")
    leaves, spec = _tree.tree_flatten(env.subtree(idx))
    stats = [spec.flatten_up_to(t) for t in (st.exp_avg_sq_row, st.exp_avg_sq_col, st.exp_avg_sq)]
    avg = _state_list(st.exp_avg, idx, env, "adafactor's exp_avg")[0] if hp["beta1"] is not None else []
    decays = not _is_zero(hp["weight_decay"])
    mask = [True] * len(idx)
    if decays and hp["weight_decay_mask"] is not None:
        keep = _resolve_mask(hp["weight_decay_mask"], env.subtree(idx), env.spec, where="scale_by_adafactor")
        mask = [keep[i] for i in idx]

    def run(work: _Work) -> ScaleByAdafactorState:  # the new state of the one link
        params, grads = work.take(idx)
        sdtype = _scalar_dtype(params)
        lr = _step_size(hp["learning_rate"], st.count, dtype=sdtype, relative_step=hp["relative_step"],
                        warmup_init=hp["warmup_init"])  # fmt: skip
        beta2t = 1.0 - (st.count + 1).to(sdtype) ** hp["decay_rate"]
        own_stats = tuple(_own_sparse(work, s) for s in stats)
        us = _adafactor_moments(grads, own_stats, beta2t, hp["eps"][0])
        torch._foreach_div_(us, torch._foreach_clamp_min(torch._foreach_div(_rms_list(us), hp["clip_threshold"]), 1.0))
        lrs = [torch.clamp_min(x, hp["eps"][1]) * lr for x in _rms_list(params)] if hp["scale_parameter"] else None
        torch._foreach_mul_(us, lrs if lrs is not None else lr)
        new_avg = None
        if avg:
            avg_w = work.own(avg)
            torch._foreach_mul_(avg_w, hp["beta1"])
            torch._foreach_mul_(us, 1 - hp["beta1"])
            torch._foreach_add_(avg_w, us)
            us, new_avg = list(avg_w), _tree.tree_unflatten(spec, avg_w)
        if decays:
            us = _adafactor_decay(us, params, lrs or [lr] * len(us), hp["weight_decay"], mask)
        torch._foreach_sub_(params, us)
        trees = [_tree.tree_unflatten(spec, s) for s in own_stats]
        return ScaleByAdafactorState(st.count + 1, lr, *trees, new_avg)

    return _Plan("adafactor", lambda work: [run(work)])


def _own_sparse(work: _Work, xs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """:meth:`_Work.own` over a list with ``None`` holes (Adafactor's statistics a leaf does not have)."""
    return [x if x is None else work.own([x])[0] for x in xs]


def _adafactor_decay(
    us: list[torch.Tensor], params: list[torch.Tensor], lrs: list[Any], weight_decay: Any, mask: list[bool]
) -> list[torch.Tensor]:
    """``u + p * (weight_decay * lr)`` on the masked leaves (new tensors: ``u`` may be the state's ``exp_avg``)."""
    out = list(us)
    for j, (u, p, lr, m) in enumerate(zip(us, params, lrs, mask)):
        if m:
            out[j] = u + p * (weight_decay * lr)
    return out


# ----------------------------------------------------------------------------------------------------------
# Containers and chains.


def _described(tx: GradientTransformation) -> Description:
    d = description(tx)
    if d is None:
        raise _NotFusable(f"{getattr(tx.update, '__qualname__', tx)} is not a transformation ftrain.optim describes")
    return d


def _flatten_links(tx: GradientTransformation, state: Any) -> tuple[list[_Link], Callable[[list[Any]], Any]]:
    """The links of ``tx`` with nested ``chain`` / ``named_chain`` flattened, and ``rebuild(new_states)`` that puts
    the links' new states back into the chain's state structure."""
    d = _described(tx)
    if d.kind == "chain":
        if not isinstance(state, tuple) or len(state) != len(d.children):
            raise _NotFusable("the chain's state does not match the chain")
        parts = [_flatten_links(child, s) for child, s in zip(d.children, state)]
        return [x for links, _ in parts for x in links], lambda news: tuple(_rebuild_parts(parts, news))
    if d.kind == "named_chain":
        names = d.hparams["names"]
        if not isinstance(state, dict) or any(n not in state for n in names):
            raise _NotFusable("the named_chain's state does not match the chain")
        parts = [_flatten_links(child, state[n]) for child, n in zip(d.children, names)]
        return [x for links, _ in parts for x in links], lambda news: dict(zip(names, _rebuild_parts(parts, news)))
    return [_Link(tx, d, state)], lambda news: news[0]


def _rebuild_parts(parts: list[tuple[list[_Link], Callable]], news: list[Any]) -> list[Any]:
    out, k = [], 0
    for links, rebuild in parts:
        out.append(rebuild(news[k : k + len(links)]))
        k += len(links)
    return out


def _is_noop(d: Description) -> bool:
    """Links that pass updates through and keep their state (``identity``, zero weight decay)."""
    return d.kind == "identity" or (d.kind == "add_decayed_weights" and _is_zero(d.hparams["weight_decay"]))


def _clip(d: Description, idx: list[int], env: _Env, whole: bool) -> Callable[[_Work], None]:
    """``clip_by_global_norm`` on the grads at ``idx``: the factor as the transformation computes it, applied to
    buffers of the plan's own (the caller's grads are read, never written, unless they were donated)."""
    max_norm = d.hparams["max_norm"]

    def run(work: _Work) -> None:
        grads = [work.grads[i] for i in idx]
        norm = env.grad_norm if whole and env.grad_norm is not None else _tree.tree_global_norm(grads)
        norm = norm.to(env.device)
        work.scale_grads(idx, torch.clamp(_on(max_norm, norm.device) / (norm + 1e-6), max=1.0))

    return run


def _plan_inject(link: _Link, idx: list[int], env: _Env, whole: bool) -> _Plan:
    """``inject_hyperparams``: this step's hyper-parameters (schedules evaluated), then the inner optimizer."""
    st = _typed_state(link.state, InjectHyperparamsState, "inject_hyperparams")
    hp = link.d.hparams
    hparams = dict(st.hyperparams)
    for name, fn in hp["schedules"].items():
        like = hparams[name]
        hparams[name] = _cast(fn(st.count), like.dtype, like.device)
    inner = _plan(hp["factory"](**hp["static"], **hparams), st.inner_state, idx, env, whole=whole)
    return _Plan(
        f"inject_hyperparams({inner.name})",
        lambda work: InjectHyperparamsState(st.count + 1, hparams, inner.run(work)),
    )


def _plan_partition(link: _Link, idx: list[int], env: _Env, whole: bool) -> _Plan:
    """``partition``: each label's optimizer planned on its own leaves."""
    st = _typed_state(link.state, PartitionState, "partition")
    transforms = dict(zip(link.d.hparams["labels"], link.d.children))
    labels = _labels(link.d.hparams["param_labels"], env.subtree(idx), env.spec, transforms)
    plans = {}
    for label, tx in transforms.items():
        if label not in st.inner_states:
            raise _NotFusable(f"partition's state has no entry for {label!r}")
        plans[label] = _plan(tx, st.inner_states[label], [i for i in idx if labels[i] == label], env, whole=False)
    name = ", ".join(f"{label}: {p.name}" for label, p in plans.items())
    return _Plan(f"partition({name})", lambda work: PartitionState({k: p.run(work) for k, p in plans.items()}))


_CONTAINERS = {"inject_hyperparams": _plan_inject, "partition": _plan_partition}


def _plan_empty(tx: GradientTransformation, state: Any, env: _Env) -> _Plan:
    """A transformation over no leaves (a label of ``partition`` nothing carries): the generic update, which only
    advances counters."""
    empty = env.spec.unflatten([None] * len(env.params))
    return _Plan("empty", lambda work: tx.update(empty, state, empty)[1])


def _plan(tx: GradientTransformation, state: Any, idx: list[int], env: _Env, *, whole: bool) -> _Plan:
    """The plan for ``tx`` on the leaves at ``idx`` (``whole``: all of them, grads as the caller gave them)."""
    if not idx:
        return _plan_empty(tx, state, env)
    links, rebuild = _flatten_links(tx, state)
    active = [k for k, link in enumerate(links) if not _is_noop(link.d)]
    clips = []
    while active and links[active[0]].d.kind == "clip_by_global_norm":
        clips.append(_clip(links[active.pop(0)].d, idx, env, whole))
        whole = False
    body = _plan_body([links[k] for k in active], idx, env, whole)

    def run(work: _Work) -> Any:
        for clip in clips:
            clip(work)
        news = [link.state for link in links]
        for k, new in zip(active, body.run(work)):
            news[k] = new
        return rebuild(news)

    return _Plan("+".join(["clip"] * len(clips) + [body.name]), run)


def _plan_body(links: list[_Link], idx: list[int], env: _Env, whole: bool) -> _Plan:
    """A container alone, or a chain one of the families recognises; its ``run`` returns the links' new states."""
    if len(links) == 1 and links[0].d.kind in _CONTAINERS:
        inner = _CONTAINERS[links[0].d.kind](links[0], idx, env, whole)
        return _Plan(inner.name, lambda work: [inner.run(work)])
    code = "".join(_LETTERS.get(link.d.kind, "?") for link in links)
    for pattern, lower in _FAMILIES:
        if pattern.fullmatch(code):
            return lower(links, code, idx, env)
    kinds = " -> ".join(link.d.kind for link in links) or "nothing"
    raise _NotFusable(f"no fused kernel for the chain {kinds}")


# ----------------------------------------------------------------------------------------------------------
# Entry points.


def _check_leaf(p: Any, g: Any, device: torch.device) -> None:
    for x in (p, g):
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            raise _NotFusable(f"a leaf is a {type(x).__name__}, not a plain tensor")
        if x.dtype not in _FLOATS or x.device != device or not x.is_contiguous():
            raise _NotFusable(f"a leaf is {x.dtype} on {x.device} (fused: contiguous float32/float64 on one device)")
    if g.shape != p.shape or g.dtype != p.dtype:
        raise _NotFusable("a gradient's shape or dtype is not its parameter's")


def _prepare(tx: GradientTransformation, grads: Updates, opt_state: OptState, params: Params, grad_norm: Any) -> tuple:
    """``(plan, env)`` for a fused run, or raises :class:`_NotFusable` saying why not."""
    if torch.compiler.is_compiling():
        raise _NotFusable("compiling: the compiled step keeps the generic graph")
    p_leaves, spec = _flatten_keep_none(params)
    try:
        g_leaves = spec.flatten_up_to(grads)
    except (ValueError, TypeError):
        raise _NotFusable("the grads do not have the params' structure") from None
    if not p_leaves or p_leaves[0] is None:
        raise _NotFusable("no parameters")
    device = p_leaves[0].device
    if device.type not in ("cpu", "cuda"):
        raise _NotFusable(f"parameters on {device.type}: fused routes run on the CPU and CUDA")
    for p, g in zip(p_leaves, g_leaves):
        _check_leaf(p, g, device)
    env = _Env(spec, p_leaves, g_leaves, grad_norm, device)
    return _plan(tx, opt_state, list(range(len(p_leaves))), env, whole=True), env


def route_of(
    tx: GradientTransformation,
    grads: Updates,
    opt_state: OptState,
    params: Params,
    *,
    grad_norm: torch.Tensor | None = None,
) -> str:
    """Which route :func:`update_and_apply` takes for these arguments: ``"fused: <plan>"`` (e.g.
    ``"fused: clip+adamw"``, ``"fused: partition(decay: sgd, no_decay: sgd)"``) or ``"generic: <why not>"``.
    Computes nothing (a schedule may be evaluated)."""
    try:
        plan, _ = _prepare(tx, grads, opt_state, params, grad_norm)
    except _NotFusable as why:
        return f"generic: {why}"
    return f"fused: {plan.name}"


def update_and_apply(
    tx: GradientTransformation,
    grads: Updates,
    opt_state: OptState,
    params: Params,
    *,
    donate: bool = False,
    grad_norm: torch.Tensor | None = None,
    donate_grads: bool = False,
) -> tuple[Params, OptState]:
    """``(apply_updates(params, updates), new_opt_state)`` where ``updates, new_opt_state = tx.update(grads,
    opt_state, params)``, as fused in-place passes when ``tx`` is recognised (see the module docstring and
    :func:`route_of`).

    Args:
        tx: the optimizer.
        grads: the gradients, a tree with the params' structure. Never modified unless ``donate_grads``.
        opt_state: ``tx``'s state.
        params: the parameters.
        donate: write the new parameters and optimizer state into ``params``' and ``opt_state``'s tensors and
            return those same objects (nothing else may hold on to the old values).
        grad_norm: the global L2 norm of ``grads`` when the caller has it already (a train step reports it), so a
            ``clip_by_global_norm`` at the head of ``tx`` need not compute it again. ``None``: computed if needed.
        donate_grads: the grads are scratch the call may overwrite (a train step's own): clipping scales them in
            place instead of into a copy.

    Returns:
        ``(new_params, new_opt_state)``. Undonated, both are new tensors and the inputs are untouched.
    """
    try:
        plan, env = _prepare(tx, grads, opt_state, params, grad_norm)
    except _NotFusable:
        return _generic(tx, grads, opt_state, params, donate=donate)
    work = _Work(
        params=env.params if donate else [p.detach().clone() for p in env.params],
        grads=list(env.grads),
        grads_owned=[donate_grads] * len(env.grads),
        donate=donate,
    )
    with torch.no_grad():
        new_state = plan.run(work)
    if donate:
        return params, _copy_state_into(opt_state, new_state)
    return env.spec.unflatten(work.params), new_state


def _generic(
    tx: GradientTransformation, grads: Updates, opt_state: OptState, params: Params, *, donate: bool
) -> tuple[Params, OptState]:
    """``tx.update`` then ``apply_updates`` (in place, and the state copied into the old one, when donated)."""
    updates, new_state = tx.update(grads, opt_state, params)
    if not donate:
        return apply_updates(params, updates), new_state
    apply_updates_(params, updates)
    return params, _copy_state_into(opt_state, new_state)
