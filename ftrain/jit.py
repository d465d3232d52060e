"""``jit``: compile a whole train or eval step with ``torch.compile``; count recompiles; donate the state.

Compiling the *whole* step — forward, backward, optimizer — is what beats a hand-written loop (DESIGN.md, "Speed
measured"): Inductor fuses the optimizer's elementwise work into a few kernels. The compiled function is the
step's pure tensor core; the host-side work (train/eval mode, seeding the RNG from the state's key and step) stays
outside it, so a compiled step is reproducible run to run.

Donation (``donate=True``) makes the step write the new state into the old state's tensors, as
``torch.optim`` does in place, so peak memory does not hold two copies of params and optimizer state. The donated
state is then dead: touching any of its fields raises an error that says so.

Example:
    >>> import torch
    >>> from ftrain import TrainState, jit, losses, make_train_step, optim
    >>> state = TrainState.create(torch.nn.Linear(3, 1), optim.adamw(1e-2), key=0)
    >>> step = jit(make_train_step(lambda m, b: losses.mse(m(b["x"]), b["y"])), donate=True)
    >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}
    >>> new_state, metrics = step(state, batch)  # doctest: +SKIP
    >>> state.params  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    RuntimeError: this TrainState was donated to a step ...
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.utils._pytree

from ftrain import compile_cache as _cache
from ftrain.optim.fused import _copy_state_into
from ftrain.state import Donated, TrainState, mark_donated
from ftrain.step import EvalStep, TrainStep

__all__ = ["Donated", "Jitted", "jit"]

_OPTIMIZER_MODES = ("compiled", "eager")


def _check_alive(state: Any) -> None:
    if isinstance(state, TrainState) and isinstance(state.params, Donated):
        state.params._fail()


def _traced_logging_functions() -> set[Callable[..., Any]]:
    """``logging.Logger`` methods below error level: inside the traced step they become no-ops instead of graph
    breaks (a model's forward may log, e.g. transformers' ``warning_once`` about ``use_cache`` under activation
    checkpointing; a log line per compiled step could not be emitted anyway)."""
    names = ("debug", "info", "warning", "warn", "warning_once", "info_once")
    return {getattr(logging.Logger, n) for n in names if hasattr(logging.Logger, n)}


class Jitted:
    """A compiled :class:`~ftrain.step.TrainStep` or :class:`~ftrain.step.EvalStep`. Build with :func:`jit`.

    Attributes:
        compiles: graphs compiled so far by this step (1 after a first call that compiled one graph).
        recompiles: compiles after the first call; stays 0 when nothing retraces.
    """

    def __init__(
        self,
        step: TrainStep,
        *,
        donate: bool = False,
        fullgraph: bool = True,
        deterministic: bool = True,
        mode: str | None = None,
        dynamic: bool | None = False,
        fallback_random: bool = False,
        options: dict[str, Any] | None = None,
        backend: str | Callable = "inductor",
        optimizer: str = "compiled",
        cache_dir: str | os.PathLike | bool | None = None,
    ):
        if not isinstance(step, TrainStep):
            raise TypeError(
                f"jit: expected a step from make_train_step or make_eval_step, got {type(step).__name__}. To "
                "compile any other function use torch.compile directly."
            )
        if step.donate:
            raise ValueError(
                "jit: this step was built with make_train_step(..., donate=True), which donates eagerly; build it with "
                "donate=False and compile it with jit(step, donate=True)."
            )
        if donate and isinstance(step, EvalStep):
            raise ValueError("jit: donate=True is for train steps; an eval step does not produce a new state")
        self.step = step
        self.donate = donate
        self.deterministic = deterministic
        inductor_options = dict(options or {})
        if fallback_random:
            inductor_options["fallback_random"] = True
        if optimizer not in _OPTIMIZER_MODES:
            raise ValueError(f"jit: optimizer must be one of {_OPTIMIZER_MODES}, got {optimizer!r}")
        self.optimizer = "compiled" if isinstance(step, EvalStep) else optimizer
        if self.optimizer == "eager":
            compiled_part, self._core = step.grads_and_norm, self._eager_update_core
        else:
            compiled_part = self._donating_core if donate else step.core
        self._compiled = torch.compile(
            compiled_part,
            fullgraph=fullgraph,
            dynamic=dynamic,
            mode=mode,
            options=inductor_options or None,
            backend=backend,
        )
        if self.optimizer == "compiled":
            self._core = self._compiled
        self._compile_kwargs = dict(fullgraph=fullgraph, dynamic=dynamic, mode=mode, options=inductor_options or None)
        self._key_options = {**self._compile_kwargs, "backend": backend if isinstance(backend, str) else repr(backend),
                             "deterministic": deterministic}  # fmt: skip
        precompilable = self.optimizer == "eager" and fullgraph and backend == "inductor"
        self.cache_dir = (
            _cache.resolve_cache_dir(cache_dir) if precompilable and _cache.precompile_supported() else None
        )
        self.cache_file: Path | None = None
        self.cache_loaded = False
        self._precompiled: Any = None
        self.compiles = 0
        self.calls = 0
        self._first_call_compiles = 0

    @property
    def recompiles(self) -> int:
        return self.compiles - self._first_call_compiles

    def _donating_core(self, skeleton, tx, params, buffers, opt_state, step, batch):
        new_params, new_buffers, new_opt, new_step, metrics = self.step.core(
            skeleton, tx, params, buffers, opt_state, step, batch
        )
        # torch's pytree, not optree: dynamo traces it without graph breaks.
        olds = torch.utils._pytree.tree_leaves((params, buffers, opt_state, step))
        news = torch.utils._pytree.tree_leaves((new_params, new_buffers, new_opt, new_step))
        for old, new in zip(olds, news):
            old.copy_(new)
        return params, buffers, opt_state, step, metrics

    def _eager_update_core(self, skeleton, tx, params, buffers, opt_state, step, batch):
        """``optimizer="eager"``: the compiled gradients, then the optimizer run eagerly by
        :func:`ftrain.optim.update_and_apply` (fused passes, in place when donating)."""
        grads, new_buffers, metrics = self._gradients(skeleton, params, buffers, batch)
        new_params, new_opt = self.step.update(skeleton, tx, grads, params, opt_state, metrics, donate=self.donate)
        if not self.donate:
            return new_params, new_buffers, new_opt, step + 1, metrics
        with torch.no_grad():
            _copy_state_into(buffers, new_buffers)
            step.add_(1)
        return params, buffers, opt_state, step, metrics

    def _gradients(self, *args):
        """The compiled ``step.grads_and_norm(*args)``: the precompiled function from the cache directory where its
        guards hold for ``args``, else the ``torch.compile``'d one (which compiles, or recompiles, as usual)."""
        if self.cache_dir is not None and self.calls == 0 and self._precompiled is None:
            self._precompiled = self._load_or_precompile(args)
        fn = self._precompiled
        if fn is not None and fn.guard_check(self.step, *args):
            return fn(self.step, *args)
        return self._compiled(*args)

    def _load_or_precompile(self, args: tuple) -> Any:
        """The precompiled gradient function for ``args``: loaded from ``cache_dir`` when a file of the same
        :func:`~ftrain.compile_cache.cache_key` is there, else compiled ahead of time and saved there."""
        fn = type(self.step).grads_and_norm
        self.cache_file = self.cache_dir / f"{_cache.cache_key(fn, (self.step, *args), self._key_options)}.pt2"
        _cache.trust_recorded_vector_isas(self.cache_dir)
        loaded = _cache.load(self.cache_file)
        if loaded is not None:
            self.cache_loaded = True
            loaded.disable_guard_check()  # _gradients checks them once per call
            return loaded
        try:
            kwargs = {**self._compile_kwargs, "options": {**(self._compile_kwargs["options"] or {}),
                                                         "guard_filter_fn": _cache.portable_guards}}  # fmt: skip
            compiled = torch.compile(fn, **kwargs).aot_compile(((self.step, *args), {}))
        except Exception as err:  # torch's precompile is experimental: a model it cannot save is compiled as usual
            logging.getLogger(__name__).warning("ftrain.jit: precompile failed (%s); compiling without the cache", err)
            return None
        _cache.save(compiled, self.cache_file)
        _cache.record_vector_isas(self.cache_dir)
        compiled.disable_guard_check()
        return compiled

    @contextlib.contextmanager
    def _context(self):
        before = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if self.deterministic and not before:
            torch.use_deterministic_algorithms(True)
        try:
            ignored = torch._dynamo.config.ignore_logging_functions | _traced_logging_functions()
            with torch._dynamo.config.patch(trace_autograd_ops=True, ignore_logging_functions=ignored):
                yield
        finally:
            if self.deterministic and not before:
                torch.use_deterministic_algorithms(False, warn_only=warn_only)

    def __call__(self, state: TrainState, batch: Any):
        _check_alive(state)
        # A copy, not int(state.step): reading the value would sync the host with the device on every step.
        step_before = state.step.detach().clone() if self.donate else 0
        counters = torch._dynamo.utils.counters["stats"]
        before = counters["unique_graphs"]
        try:
            with self._context():
                new_state, metrics = self.step.run(self._core, state, batch)
        except Exception as err:
            if counters["unique_graphs"] != before or self.calls == 0:
                self._raise_eager_error(state, batch, err)
            raise
        self.compiles += counters["unique_graphs"] - before
        if self.calls == 0:
            self._first_call_compiles = self.compiles
        self.calls += 1
        if self.donate:
            mark_donated(state, step_before)
        if isinstance(self.step, EvalStep):
            return metrics
        return new_state, metrics

    def _raise_eager_error(self, state: TrainState, batch: Any, err: Exception) -> None:
        """A failed compile often hides a plain Python error (a missing batch key, a shape mismatch) behind
        dynamo's message: run the step eagerly once and raise its error if it has one."""
        try:
            self.step(state, batch)
        except Exception as eager_err:
            raise eager_err from err

    def __repr__(self) -> str:
        return f"jit({type(self.step).__name__}, donate={self.donate}, compiles={self.compiles})"


def jit(step: TrainStep, *, donate: bool = False, **kwargs: Any) -> Jitted | Callable:
    """Compiles ``step`` (from :func:`~ftrain.step.make_train_step` or ``make_eval_step``) with torch.compile.

    Args:
        step: the step to compile; called the same way as the original.
        donate: write the new state into the old state's tensors (peak memory as with ``torch.optim``); the
            passed state is dead afterwards.
        fullgraph: fail instead of silently falling back to eager on a graph break (default True).
        deterministic: run with ``torch.use_deterministic_algorithms(True)`` (default True): without it a
            multithreaded Inductor kernel (embedding backward) made reruns differ from step 1.
        mode, dynamic, options, backend: passed to ``torch.compile`` (``backend`` defaults to ``"inductor"``);
            ``fallback_random=True`` makes dropout match eager.
        optimizer: ``"compiled"`` (default): the whole step — forward, backward, optimizer — is one graph.
            ``"eager"``: only the gradients (forward, backward, ``grad_norm``; :meth:`TrainStep.grads_and_norm`)
            are compiled and the optimizer runs eagerly through :func:`ftrain.optim.update_and_apply` (in place
            when ``donate``): a smaller graph, so a shorter first compile, and the one that can be precompiled.
        cache_dir: with ``optimizer="eager"`` (``fullgraph``, Inductor, torch with precompile): where the compiled
            gradient function is saved after the first compile and loaded from by a later process, which then skips
            tracing and compiling (a rerun or a resume starts in seconds). ``None``: the environment variable
            ``FTRAIN_COMPILE_CACHE``, else ``~/.cache/ftrain/compile``; ``False`` (or ``FTRAIN_COMPILE_CACHE=off``):
            no cache. One file per :func:`ftrain.compile_cache.cache_key`: a sha256 of torch's, Python's and
            ftrain's versions and ftrain's step source files; the step's loss function by content (bytecode,
            constants, closure values, the functions it calls, their source files) and the step's settings
            (accumulation, train mode); the model's submodule classes, their source files, printed sizes and
            settings, train/eval mode and transformers config; the structure, shapes, strides, dtypes and devices of
            params, buffers and batch; and the compile options (mode, dynamic, Inductor options, backend,
            deterministic). A changed model, loss or batch shape gets another file; the loaded function's
            saved guards (shapes, dtypes) are also checked on every call, and a failed check compiles as usual.
            The file holds the generated code, not the machine code: keep torch's Inductor cache
            (``TORCHINDUCTOR_CACHE_DIR``) too, or the C++ kernels are rebuilt on load.

    Returns:
        A :class:`Jitted` step with ``compiles`` and ``recompiles`` counters, and ``cache_file`` / ``cache_loaded``
        (the precompile file used, and whether this process loaded it instead of compiling).
    """
    return Jitted(step, donate=donate, **kwargs)
