"""``HfArgumentParser``: command-line flags, dicts, JSON and YAML files into dataclass instances.

A drop-in for ``transformers.HfArgumentParser``: each field of each dataclass becomes a ``--field_name`` option
(also ``--field-name``), typed from the field's annotation and documented by its ``help`` metadata, so the
usual script

    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses()

parses ``--learning_rate 3e-4 --do_train --no_remove_unused_columns --report_to none`` the same way.

How annotations become options:

- ``bool`` (or ``bool | None``): ``--flag`` alone means True, ``--flag false`` / ``--flag 0`` means False;
  a field that defaults to True also gets ``--no_flag``.
- an ``Enum`` or ``Literal`` (alone or ``| str``): ``choices`` are the values.
- ``list[X]``: one or more values (``nargs="+"``). ``str | list[str]`` also takes one or more, and a single
  value stays a string (``--report_to tensorboard`` gives ``"tensorboard"``, as in transformers).
- ``dict`` (without ``str``): a JSON object (``--cfg '{"a": 1}'``). ``dict | str`` fields keep the string,
  which the dataclass parses (``TrainingArguments`` does).
- ``X | None``: as ``X``; ``int | float`` and other unions of scalars try each type in turn.

Errors are one line: an unknown option names the closest known ones, a bad value names the option and the
value (no 200-line usage dump).

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Args:
    ...     lr: float = 1e-3
    ...     layers: list[int] = field(default_factory=lambda: [2])
    ...     shuffle: bool = True
    >>> HfArgumentParser(Args).parse_args_into_dataclasses(["--lr", "3e-4", "--layers", "4", "8", "--no_shuffle"],
    ...                                                   look_for_args_file=False)
    (Args(lr=0.0003, layers=[4, 8], shuffle=False),)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NoReturn, Union

__all__ = ["ArgumentParser", "HfArgumentParser", "string_to_bool"]

DataClassType = Any
_PASSED_METADATA = ("help", "choices", "nargs", "const", "metavar", "required")


def string_to_bool(value: str | bool) -> bool:
    """``yes/true/t/y/1`` -> True and ``no/false/f/n/0`` -> False (any case).

    Raises:
        argparse.ArgumentTypeError: any other string.
    """
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


def _named(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Gives a converter the name argparse shows in "invalid <name> value" messages."""
    fn.__name__ = name
    return fn


def _choice_converter(choices: list[Any]) -> Callable[[str], Any]:
    """Maps the text of each choice back to the choice (an Enum member's value, or a Literal's value)."""
    by_text = {str(c): c for c in choices}
    return _named(lambda text: by_text.get(text, text), "choice")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _first_that_parses(types_: list[type]) -> Callable[[str], Any]:
    """A converter trying each scalar type in order (``int`` before ``float``, ``str`` last)."""
    order = sorted(types_, key=lambda t: {bool: 0, int: 1, float: 2, str: 4}.get(t, 3))

    def convert(text: str) -> Any:
        for t in order:
            try:
                return string_to_bool(text) if t is bool else t(text)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                continue
        raise argparse.ArgumentTypeError(f"expected one of {[t.__name__ for t in order]}, got {text!r}")

    return _named(convert, " | ".join(t.__name__ for t in order))


def _bool_or_text(text: str) -> bool | str:
    """For ``str | bool`` fields: a boolean word becomes a bool, anything else stays text."""
    try:
        return string_to_bool(text)
    except argparse.ArgumentTypeError:
        return text


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Enum)


def _is_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _is_list(tp: Any) -> bool:
    return tp is list or typing.get_origin(tp) is list


def _argparse_kwargs(field: dataclasses.Field, tp: Any) -> tuple[dict[str, Any], bool]:
    """argparse keyword arguments for one field (type, nargs, choices, default) and whether it is a bool
    that defaults to True (which then gets a ``--no_`` twin).

    Raises:
        TypeError: an annotation the parser cannot express (say ``list[int] | dict``).
    """
    members = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    enums = [m for m in members if _is_enum(m)]
    literals = [m for m in members if typing.get_origin(m) is Literal]
    lists = [m for m in members if _is_list(m)]
    kwargs: dict[str, Any] = {}
    default_true = False
    if enums or (literals and str not in members):
        choices = [v.value for e in enums for v in e] + [v for lit in literals for v in typing.get_args(lit)]
        kwargs.update(type=_choice_converter(choices), choices=choices)
    elif literals:  # ``str | Literal[False]``: free text
        kwargs["type"] = str
    elif members == [bool]:
        kwargs.update(type=_named(string_to_bool, "bool"), nargs="?", const=True)
        default_true = field.default is True
    elif set(members) == {str, bool}:
        kwargs.update(type=_named(_bool_or_text, "bool or str"), nargs="?", const=True)
    elif lists:
        item = typing.get_args(lists[0])[0] if typing.get_args(lists[0]) else str
        kwargs.update(nargs="+", type=_choice_converter([v.value for v in item]) if _is_enum(item) else item)
        if _is_enum(item):
            kwargs["choices"] = [v.value for v in item]
    elif any(_is_dict(m) for m in members):
        kwargs["type"] = str if str in members else _named(_json_object, "JSON object")
    elif len(members) == 1:
        kwargs["type"] = str if members[0] is Any else members[0]
    elif all(m in (int, float, str, bool) for m in members):
        kwargs["type"] = _first_that_parses(members)
    else:
        raise TypeError(
            f"HfArgumentParser: cannot build a command-line option for field {field.name!r} of type {tp}; use a "
            "single type (optionally | None), an Enum, a Literal, a list[...] or a dict."
        )
    return kwargs, default_true


def _single_value_stays_str(tp: Any) -> bool:
    """``str | list[str]`` fields: one value on the command line stays a plain string."""
    members = typing.get_args(tp) if _is_union(tp) else ()
    return str in members and any(_is_list(m) for m in members)


class HfArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose options come from dataclass fields (transformers' API).

    Args:
        dataclass_types: one dataclass type or an iterable of them; instances are returned in this order. A
            dataclass with an ``_argument_group_name`` attribute gets its own ``--help`` section.
        **kwargs: passed to ``argparse.ArgumentParser`` (default formatter: shows defaults in ``--help``).

    Raises:
        TypeError: a field annotation that cannot be parsed from the command line.
    """

    def __init__(self, dataclass_types: DataClassType | Iterable[DataClassType] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        if dataclass_types is None:
            dataclass_types = []
        elif dataclasses.is_dataclass(dataclass_types) or not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        self.dataclass_types = list(dataclass_types)
        self._keep_single_str: set[str] = set()
        for dtype in self.dataclass_types:
            self._add_dataclass_arguments(dtype)

    def _add_dataclass_arguments(self, dtype: DataClassType) -> None:
        group = self.add_argument_group(dtype._argument_group_name) if hasattr(dtype, "_argument_group_name") else self
        try:
            hints = typing.get_type_hints(dtype)
        except NameError as err:
            raise TypeError(
                f"HfArgumentParser: the annotations of {dtype.__name__} could not be resolved ({err}); declare the "
                "dataclass at module level so its type names can be found."
            ) from err
        for field in dataclasses.fields(dtype):
            if field.init:
                self._add_field(group, field, hints[field.name])

    def _add_field(self, group: Any, field: dataclasses.Field, tp: Any) -> None:
        kwargs, default_true = _argparse_kwargs(field, tp)
        kwargs.update({k: v for k, v in field.metadata.items() if k in _PASSED_METADATA})
        kwargs.setdefault("help", "")  # so ArgumentDefaultsHelpFormatter shows the default
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        else:
            kwargs["required"] = True
        if _single_value_stays_str(tp):
            self._keep_single_str.add(field.name)
        names = [f"--{field.name}"]
        if "_" in field.name:
            names.append(f"--{field.name.replace('_', '-')}")
        aliases = field.metadata.get("aliases", [])
        names += [aliases] if isinstance(aliases, str) else list(aliases)
        group.add_argument(*names, dest=field.name, **kwargs)
        if default_true:
            no_names = [f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}"]
            group.add_argument(
                *dict.fromkeys(no_names), action="store_false", dest=field.name, help=f"Sets {names[0]} to False."
            )

    def error(self, message: str) -> NoReturn:
        """Prints one line, ``prog: error: message (see --help)``, and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help for the options)\n")

    def _unknown_message(self, remaining: list[str]) -> str:
        known = [a.option_strings[0] for a in self._actions if a.option_strings and a.option_strings[0][:2] == "--"]
        hints = []
        for arg in remaining:
            if arg.startswith("--"):
                close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=2, cutoff=0.8)
                if close:
                    hints.append(f"{arg} (did you mean {' or '.join(close)}?)")
        tail = f"; {', '.join(hints)}" if hints else ""
        return f"HfArgumentParser: arguments not used by any dataclass: {remaining}{tail}."

    def parse_args_into_dataclasses(
        self,
        args: list[str] | None = None,
        return_remaining_strings: bool = False,
        look_for_args_file: bool = True,
        args_filename: str | os.PathLike | None = None,
        args_file_flag: str | None = None,
    ) -> tuple[Any, ...]:
        """Parses command-line strings into one instance of each dataclass.

        Args:
            args: the strings (default: ``sys.argv[1:]``).
            return_remaining_strings: return the strings no option took as a last element instead of raising.
            look_for_args_file: also read ``<script>.args`` next to ``sys.argv[0]`` if it exists (its options come
                first, so the command line wins).
            args_filename: read this file instead of ``<script>.args``.
            args_file_flag: an option (e.g. ``--args_file``) naming more such files; later ones win.

        Returns:
            The dataclass instances in order, then a ``Namespace`` of options added with ``add_argument`` (if
            any), then the remaining strings (with ``return_remaining_strings``).

        Raises:
            ValueError: strings no option takes (without ``return_remaining_strings``), or a dataclass's own
                validation error.
            SystemExit: a malformed option value (a one-line message on stderr) or ``--help``.
        """
        args = list(sys.argv[1:] if args is None else args)
        args = self._read_args_files(args, look_for_args_file, args_filename, args_file_flag)
        namespace, remaining = self.parse_known_args(args=args)
        for name in self._keep_single_str:
            value = getattr(namespace, name, None)
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                setattr(namespace, name, value[0])
        outputs: list[Any] = []
        for dtype in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(dtype) if f.init}
            outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
            for k in keys:
                delattr(namespace, k)
        if vars(namespace):
            outputs.append(namespace)
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            raise ValueError(self._unknown_message(remaining))
        return tuple(outputs)

    def _read_args_files(
        self, args: list[str], look: bool, filename: str | os.PathLike | None, flag: str | None
    ) -> list[str]:
        files: list[Path] = []
        if filename:
            files.append(Path(filename))
        elif look and sys.argv and sys.argv[0]:
            files.append(Path(sys.argv[0]).with_suffix(".args"))
        if flag:
            finder = argparse.ArgumentParser(add_help=False)
            finder.add_argument(flag, type=str, action="append")
            found, args = finder.parse_known_args(args=args)
            files += [Path(p) for p in (getattr(found, flag.lstrip("-").replace("-", "_")) or [])]
        from_files = [token for f in files if f.exists() for token in f.read_text().split()]
        return from_files + args

    def parse_dict(self, args: dict[str, Any], allow_extra_keys: bool = False) -> tuple[Any, ...]:
        """Builds the dataclasses from a dict (no string conversion: values are passed as they are).

        Raises:
            ValueError: keys no dataclass has (unless ``allow_extra_keys``).
        """
        unused = set(args)
        outputs = []
        for dtype in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(dtype) if f.init}
            inputs = {k: v for k, v in args.items() if k in keys}
            unused -= inputs.keys()
            outputs.append(dtype(**inputs))
        if unused and not allow_extra_keys:
            known = [f.name for d in self.dataclass_types for f in dataclasses.fields(d)]
            hints = [
                f"{k} (did you mean {difflib.get_close_matches(k, known, n=1)[0]}?)"
                for k in sorted(unused)
                if difflib.get_close_matches(k, known, n=1)
            ]
            tail = f"; {', '.join(hints)}" if hints else ""
            raise ValueError(f"HfArgumentParser: keys not used by any dataclass: {sorted(unused)}{tail}.")
        return tuple(outputs)

    def parse_json_file(self, json_file: str | os.PathLike, allow_extra_keys: bool = False) -> tuple[Any, ...]:
        """:meth:`parse_dict` of a JSON file's object."""
        data = json.loads(Path(json_file).read_text(encoding="utf-8"))
        return self.parse_dict(data, allow_extra_keys=allow_extra_keys)

    def parse_yaml_file(self, yaml_file: str | os.PathLike, allow_extra_keys: bool = False) -> tuple[Any, ...]:
        """:meth:`parse_dict` of a YAML file's mapping (needs PyYAML).

        Raises:
            ImportError: PyYAML is not installed (``pip install pyyaml``).
        """
        try:
            import yaml
        except ImportError as err:
            raise ImportError("parse_yaml_file needs PyYAML: pip install pyyaml") from err
        data = yaml.safe_load(Path(yaml_file).read_text(encoding="utf-8"))
        return self.parse_dict(data, allow_extra_keys=allow_extra_keys)


ArgumentParser = HfArgumentParser
"""Alias: ``ftrain.trainer.hf_argparser.ArgumentParser`` is :class:`HfArgumentParser`."""
