"""Loads pyiso8583 specs (built-in or YAML), deep-copied, validated and frozen."""

from __future__ import annotations

import contextlib
import copy
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from iso8583 import specs as _builtin

from codec.errors import SpecError
from codec.quick import MAX_PLANS, adopt

__all__ = ["BUILTIN_SPECS", "Spec", "load_spec"]

Spec = Mapping[str, Mapping[str, Any]]

BUILTIN_SPECS = ("default", "default_ascii")

_FIELD_NAMES = frozenset({"h", "t", "p", *(str(n) for n in range(1, 129))})
_REQUIRED = ("data_enc", "len_enc", "len_type", "max_len")
_OPTIONAL = frozenset({"desc", "len_count", "left_pad", "right_pad"})
_NO_HEADER: Mapping[str, Any] = {
    "data_enc": "ascii",
    "len_enc": "ascii",
    "len_type": 0,
    "max_len": 0,
    "desc": "Message Header",
}
_WORD = re.compile(r"[A-Za-z0-9_]{1,24}")


def load_spec(ref: str, *, base_dir: Path | None = None) -> Spec:
    """Load a built-in spec by name or a YAML spec file (relative to ``base_dir``)."""
    if ref in BUILTIN_SPECS:
        return _freeze(_builtin_copy(ref))
    if ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref:
        path = Path(ref)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return _freeze(_load_yaml(path))
    raise SpecError(
        f"unknown spec {_name(ref)}: use one of {', '.join(BUILTIN_SPECS)} or a .yaml file"
    )


def _builtin_copy(name: str) -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = copy.deepcopy(getattr(_builtin, name))
    return spec


def _load_yaml(path: Path) -> dict[str, dict[str, Any]]:
    where = f"spec file {path}"
    doc, problem = _read_yaml(path)
    # Raised outside the except blocks: the OS / YAML errors quote file contents.
    if problem is not None:
        raise SpecError(f"{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected a mapping with 'fields' (and optional 'base')")
    unknown = set(doc) - {"base", "fields"}
    if unknown:
        raise SpecError(f"{where}: unknown top-level key {_name(sorted(map(str, unknown))[0])}")

    base = doc.get("base")
    if base is None:
        spec: dict[str, dict[str, Any]] = {}
    elif base in BUILTIN_SPECS:
        spec = _builtin_copy(base)
    else:
        raise SpecError(f"{where}: base must be one of {', '.join(BUILTIN_SPECS)}")

    fields = doc.get("fields")
    if not isinstance(fields, dict):
        raise SpecError(f"{where}: 'fields' must be a mapping of field name to definition")
    for key, definition in fields.items():
        name = _field_name(key, where)
        if not isinstance(definition, dict):
            raise SpecError(f"{where}: definition must be a mapping", field=name)
        spec[name] = {**spec.get(name, {}), **{str(k): v for k, v in definition.items()}}

    spec.setdefault("h", dict(_NO_HEADER))
    for name in ("t", "p"):
        if name not in spec:
            raise SpecError(f"{where}: field is required", field=name)
    for name, definition in spec.items():
        _check_field(definition, where, name)
    return spec


def _read_yaml(path: Path) -> tuple[Any, str | None]:
    """The parsed document, or a problem description that quotes nothing from the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return None, f"cannot read ({e.strerror or type(e).__name__})"
    except UnicodeError:
        return None, "cannot read (not UTF-8)"
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return None, f"invalid YAML{at}"


def _field_name(key: object, where: str) -> str:
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise SpecError(f"{where}: field names must be h, t, p or 1..128")
    name = str(key)
    if name not in _FIELD_NAMES:
        raise SpecError(f"{where}: unknown field name {_name(name)}; use h, t, p or 1..128")
    return name


def _check_field(definition: Mapping[str, Any], where: str, name: str) -> None:
    for attr in _REQUIRED:
        if attr not in definition:
            raise SpecError(f"{where}: missing {attr}", field=name)
    extra = set(definition) - _OPTIONAL - set(_REQUIRED)
    if extra:
        raise SpecError(f"{where}: unknown attribute {_name(sorted(extra)[0])}", field=name)
    if not _is_int(definition["len_type"]) or not 0 <= definition["len_type"] <= 4:
        raise SpecError(f"{where}: len_type must be an integer 0..4", field=name)
    if not _is_int(definition["max_len"]) or definition["max_len"] < 0:
        raise SpecError(f"{where}: max_len must be an integer >= 0", field=name)
    if not _known_encoding(definition["data_enc"], extra=("b",)):
        raise SpecError(f"{where}: unknown data_enc", field=name)
    if not _known_encoding(definition["len_enc"], extra=("b", "bcd")):
        raise SpecError(f"{where}: unknown len_enc", field=name)
    if definition.get("len_count", "bytes") not in ("bytes", "nibbles"):
        raise SpecError(f"{where}: len_count must be bytes or nibbles", field=name)
    for pad in ("left_pad", "right_pad"):  # null too: pyiso8583 would fail on it mid-decode
        value = definition.get(pad)
        if pad in definition and not (isinstance(value, str) and len(value) == 1):
            raise SpecError(f"{where}: {pad} must be a single character", field=name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _known_encoding(value: object, *, extra: tuple[str, ...]) -> bool:
    """A text codec Python knows (so digits encode with it), or one of pyiso8583's extras."""
    if not isinstance(value, str):
        return False
    if value in extra:
        return True
    try:
        "0123456789".encode(value)
    except (LookupError, UnicodeError):
        return False
    return True


def _name(value: str) -> str:
    """Echo a name in an error only when it is a short plain word."""
    return repr(value) if _WORD.fullmatch(value) else "(unprintable)"


def _freeze(spec: Mapping[str, Mapping[str, Any]]) -> Spec:
    """A read-only copy no one else holds, decoded on the quick path (`codec.quick`).
    Specs with the same content share one copy, so a spec loaded again (a config reload,
    each of a generator's connections) finds the plan already made for it, and the one a
    listener kept since it started stays among the latest adopted."""
    content = tuple(sorted((name, tuple(sorted(d.items()))) for name, d in spec.items()))
    try:
        frozen = _loaded.get(content)
    except TypeError:  # a list or mapping YAML gave as a value (a desc, say): not shared
        frozen = _copy(spec)
    else:
        if frozen is not None:
            with contextlib.suppress(KeyError):  # unless another thread just dropped it
                _loaded.move_to_end(content)
        else:
            frozen = _copy(spec)
            while len(_loaded) >= MAX_PLANS:
                with contextlib.suppress(KeyError):  # another thread emptied it first
                    _loaded.popitem(last=False)
            _loaded[content] = frozen
    adopt(frozen)
    return frozen


def _copy(spec: Mapping[str, Mapping[str, Any]]) -> Spec:
    return MappingProxyType({name: MappingProxyType(dict(d)) for name, d in spec.items()})


# The specs loaded, by content, least recently loaded first (as many as the quick path
# keeps plans for).
_loaded: OrderedDict[tuple[Any, ...], Spec] = OrderedDict()
