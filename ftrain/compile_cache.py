"""A cache of precompiled steps between processes, so that a rerun or a resume starts in seconds.

torch keeps its own caches on disk (Inductor's FX-graph cache and the AOTAutograd cache, under
``TORCHINDUCTOR_CACHE_DIR``, ``/tmp/torchinductor_<user>`` by default): with them a second process skips Inductor's
code generation and C++ compile, but it still traces the step with dynamo, which on a small GPT-2 is most of a warm
first step. torch's precompile (``torch.compile(fn).aot_compile(...)``, ``torch.compiler.load_compiled_function``,
torch >= 2.13, experimental) saves the traced result too; this module keeps one such file per compiled function in a
directory and names the file by a key of everything that decides the compiled code (:func:`cache_key`), so a
changed model, loss, batch shape or option never loads a file made for another.

The directory: the ``cache_dir`` argument of :func:`ftrain.jit`, else the environment variable
``FTRAIN_COMPILE_CACHE``, else ``~/.cache/ftrain/compile`` (``$XDG_CACHE_HOME`` when set). ``cache_dir=False`` or
``FTRAIN_COMPILE_CACHE=off`` turns it off.

Example:
    >>> import os
    >>> resolve_cache_dir(False) is None, str(resolve_cache_dir("/tmp/c"))
    (True, '/tmp/c')
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree

__all__ = [
    "ENV",
    "cache_key",
    "portable_guards",
    "precompile_supported",
    "record_vector_isas",
    "resolve_cache_dir",
    "trust_recorded_vector_isas",
]

ENV = "FTRAIN_COMPILE_CACHE"
_OFF = ("", "0", "off", "false", "no")
_log = logging.getLogger(__name__)


def precompile_supported() -> bool:
    """Whether this torch can save and load a precompiled function (2.13 has it; 2.11 does not)."""
    return hasattr(torch.compiler, "load_compiled_function")


def portable_guards(entries: list[Any]) -> list[bool]:
    """A ``guard_filter_fn`` for precompile: keeps the guards that can be saved (tensor shapes, dtypes, devices,
    plain values) and drops those on object identity (modules, functions, closures, globals), which mean nothing in
    another process. What they checked is in :func:`cache_key`."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaveable = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (e.is_global or e.guard_type in unsaveable or unsaveable.intersection(e.derived_guard_types))
        for e in entries
    ]


def resolve_cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The cache directory: ``cache_dir`` if a path, none if ``False``; for ``None`` or ``True``, the environment
    variable ``FTRAIN_COMPILE_CACHE`` (``off`` turns the cache off), else ``~/.cache/ftrain/compile``."""
    if cache_dir is False:
        return None
    if cache_dir is not None and cache_dir is not True:
        return Path(cache_dir)
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ftrain" / "compile"


def _source_hash(obj: Any) -> str:
    """The text of the file that defines ``obj`` (its class for an instance), hashed; ``""`` when it has none."""
    target = obj if isinstance(obj, types.FunctionType | type | types.ModuleType) else type(obj)
    try:
        path = inspect.getsourcefile(target)
    except TypeError:
        return ""
    if path is None or not os.path.exists(path):
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _function_fingerprint(fn: Any, depth: int = 0) -> list[str]:
    """A function's identity by content: its module, name, bytecode and constants, the functions it calls by
    global name and the values in its closure (functions recursively, four levels deep; other values by type and
    repr), plus the source files that define them."""
    if isinstance(fn, types.MethodType):
        return [type(fn.__self__).__qualname__, _source_hash(fn.__self__), *_function_fingerprint(fn.__func__, depth)]
    if not isinstance(fn, types.FunctionType) or depth > 4:
        return [type(fn).__qualname__, _source_hash(fn), repr(fn) if _is_plain(fn) else ""]
    code = fn.__code__
    out = [fn.__module__, fn.__qualname__, _code_fingerprint(code), _source_hash(fn)]
    for name in code.co_names:  # functions it calls by global name (a lambda calling the real loss function)
        value = fn.__globals__.get(name)
        if isinstance(value, types.FunctionType) and value is not fn:
            out += _function_fingerprint(value, depth + 1)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        out += _function_fingerprint(value, depth + 1) if callable(value) else [type(value).__qualname__, _plain(value)]
    return out


def _code_fingerprint(code: types.CodeType) -> str:
    """Bytecode and constants, nested code objects (comprehensions, inner functions) by their own content: their
    ``repr`` holds a memory address, which differs from process to process."""
    consts = [_code_fingerprint(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}({','.join(consts)})"


def _is_plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | type(None) | torch.dtype | torch.device)


def _plain(value: Any) -> str:
    return repr(value) if _is_plain(value) else type(value).__qualname__


def _tree_layout(tree: Any) -> list[str]:
    """The tree's structure and, per tensor leaf, shape, dtype, device, layout and strides (what the guards and
    the generated kernels depend on); other leaves by type and plain value."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    out = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(f"{type(leaf).__name__}{tuple(leaf.shape)}{leaf.stride()}{leaf.dtype}{leaf.device}{leaf.layout}")
            out.append(f"grad={leaf.requires_grad}")
        else:
            out.append(f"{type(leaf).__qualname__}={_plain(leaf)}")
    return out


def _module_fingerprint(module: torch.nn.Module) -> list[str]:
    """The module tree: every submodule's class, the source file defining it, and its printed form (sizes and
    settings such as dropout rates), with the mode (train / eval) of each."""
    out = []
    for name, sub in module.named_modules():
        out += [
            name,
            type(sub).__module__,
            type(sub).__qualname__,
            _source_hash(sub),
            sub.extra_repr(),
            str(sub.training),
        ]
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        out.append(config.to_json_string())
    return out


def cache_key(fn: Callable, args: tuple, options: dict[str, Any]) -> str:
    """The name of a precompiled ``fn(*args)`` in the cache: a sha256 over

    - torch's, Python's and ftrain's versions, and the source files of ``ftrain.step``, ``ftrain.module``,
      ``ftrain.random`` and ``ftrain.jit``;
    - ``fn`` and every function reached from it through arguments and closures (the step's loss function, its
      closure's settings): module, qualified name, bytecode, constants, the defining source file;
    - each argument: a module's submodule classes, their source files, printed sizes and settings, train/eval mode
      and transformers config; a tree's structure and each tensor's shape, strides, dtype, device, layout;
    - ``options``: the ``jit`` options that change the compiled code (mode, dynamic, Inductor options, backend,
      deterministic algorithms, ``fullgraph``).

    Two calls with equal keys compile to the same code; anything else gives another key. torch checks the loaded
    function's guards on every call as well, and :class:`ftrain.jit.Jitted` compiles afresh when they fail.
    """
    import ftrain

    parts = [torch.__version__, sys.version, getattr(ftrain, "__version__", "")]
    for name in ("ftrain.step", "ftrain.module", "ftrain.random", "ftrain.jit", "ftrain.losses"):
        parts.append(_source_hash(sys.modules.get(name) or __import__(name, fromlist=["_"])))
    parts += _function_fingerprint(fn)
    for arg in args:
        if isinstance(arg, torch.nn.Module):
            parts += _module_fingerprint(arg)
        elif hasattr(arg, "loss_fn"):  # a TrainStep: its settings and its loss function
            settings = sorted((k, _plain(v)) for k, v in vars(arg).items() if _is_plain(v))
            parts += [type(arg).__qualname__, repr(settings), *_function_fingerprint(arg.loss_fn)]
        elif callable(arg) and not isinstance(arg, torch.Tensor):
            parts += _function_fingerprint(arg)
        else:
            parts += _tree_layout(arg)
    parts.append(
        repr(sorted((k, _plain(v) if not isinstance(v, dict) else repr(sorted(v.items()))) for k, v in options.items()))
    )
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def load(path: Path) -> Any | None:
    """The precompiled function saved at ``path``, or ``None`` when there is none or it does not load (a file from
    another machine or torch build; logged, then compiled afresh)."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            return torch.compiler.load_compiled_function(f)
    except Exception as err:  # a stale or foreign file must never stop training: compile instead
        _log.warning("ftrain.jit: could not load the precompiled step %s (%s); compiling it again", path, err)
        return None


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then renamed over it: a reader (another process of
    the same cache) sees the old file or the whole new one. Raises what ``write`` raises, leaving no file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(compiled: Any, path: Path) -> None:
    """Writes a precompiled function to ``path`` atomically; a failure is logged (the step still runs)."""
    try:
        _write_atomically(path, lambda tmp: compiled.save_compiled_function(str(tmp)))
    except Exception as err:
        _log.warning("ftrain.jit: could not save the precompiled step to %s (%s)", path, err)


# --- Inductor's vector-ISA probe ----------------------------------------------------------------------------------
#
# Before it loads or builds CPU kernels, Inductor checks once per process which vector instruction sets (AVX2,
# AVX-512, ...) the CPU reports *and* the C++ compiler can build and load: for each, a test library is built (cached
# on disk) and then dlopen-ed in a fresh subprocess, about 1.8 s of a 3 s warm first step here. The answer only
# depends on the machine, the compiler and torch, so the first process records it next to the precompiled steps and
# later ones reuse it: when every ISA the CPU reports passed the probe, Inductor is told so (``cpp.vec_isa_ok``)
# while it makes its (cached, per-process) list, which is then the list the probe would have made.

_ISA_RECORD = "vector_isa.json"


def _isa_candidates() -> tuple[Any, list[Any]] | None:
    """Inductor's ISA module and the ISAs this CPU reports (before the build probe); ``None`` off x86-64 Linux."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return cpu_vec_isa, [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def _isa_machine_key(cpu_vec_isa: Any, candidates: list[Any]) -> str:
    """What the probe's answer depends on: torch, the C++ compiler (its version), the CPU's ISAs, ``CXX``."""
    compiler = cpu_vec_isa._get_isa_dry_compile_fingerprint("")
    return hashlib.sha256(repr((compiler, [str(c) for c in candidates], os.environ.get("CXX"))).encode()).hexdigest()


def trust_recorded_vector_isas(cache_dir: Path | None) -> bool:
    """Skips Inductor's ISA probe in this process when ``cache_dir`` records that, on this machine, every ISA the
    CPU reports passed it; returns whether it did. Never raises (the probe then runs as usual)."""
    try:
        found = _isa_candidates()
        if cache_dir is None or found is None or torch._inductor.config.cpp.vec_isa_ok is not None:
            return False
        cpu_vec_isa, candidates = found
        record = json.loads((cache_dir / _ISA_RECORD).read_text())
        if not candidates or record.get(_isa_machine_key(cpu_vec_isa, candidates)) is not True:
            return False
        with torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
            return [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] == [str(c) for c in candidates]
    except Exception:  # no record, another torch's internals: the probe runs
        return False


def record_vector_isas(cache_dir: Path | None) -> None:
    """Records in ``cache_dir`` whether this process's ISA probe passed every ISA the CPU reports (the probe has
    run by then: a step was compiled). Never raises."""
    try:
        found = _isa_candidates()
        if cache_dir is None or found is None or torch._inductor.config.cpp.vec_isa_ok is not None:
            return
        cpu_vec_isa, candidates = found
        if not cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:  # no CPU kernels built: nothing was probed
            return
        path = cache_dir / _ISA_RECORD
        record = json.loads(path.read_text()) if path.exists() else {}
        probed = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]
        record[_isa_machine_key(cpu_vec_isa, candidates)] = probed == [str(c) for c in candidates]
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record)))
    except Exception as err:
        _log.debug("ftrain.jit: could not record the vector ISA probe (%s)", err)
