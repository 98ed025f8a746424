"""load_spec: built-ins, YAML files, validation, freezing."""

from __future__ import annotations

from pathlib import Path

import iso8583
import pytest

from codec import BUILTIN_SPECS, Message, Mti, SpecError, decode, encode, load_spec


@pytest.mark.parametrize("name", BUILTIN_SPECS)
def test_builtin_is_a_frozen_copy(name: str) -> None:
    spec = load_spec(name)
    original = getattr(iso8583.specs, name)
    assert {k: dict(v) for k, v in spec.items()} == original
    assert spec["2"] is not original["2"]
    with pytest.raises(TypeError):
        spec["2"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        spec["2"]["max_len"] = 99  # type: ignore[index]
    with pytest.raises(AttributeError):
        spec["2"].pop("max_len")  # type: ignore[attr-defined]


def test_loads_are_independent_of_the_global(monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_spec("default")
    monkeypatch.setitem(iso8583.specs.default["2"], "max_len", 5)
    assert first["2"]["max_len"] == 19
    second = load_spec("default")
    assert second["2"]["max_len"] == 5
    assert second is not first
    monkeypatch.undo()
    assert load_spec("default")["2"]["max_len"] == 19
    assert first["2"]["max_len"] == 19


def test_builtins_differ_in_bitmap_encoding() -> None:
    assert load_spec("default")["p"]["data_enc"] == "b"
    assert load_spec("default_ascii")["p"]["data_enc"] == "ascii"


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_overrides_and_extends_the_base(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base: default_ascii\n"
        "fields:\n"
        "  2: {max_len: 12}\n"
        '  "35": {data_enc: ascii, len_enc: bcd, len_type: 1, max_len: 37, desc: "Track 2"}\n'
        "  h: {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 6}\n",
    )
    spec = load_spec(str(path))
    assert dict(spec["2"]) == {**iso8583.specs.default_ascii["2"], "max_len": 12}
    assert dict(spec["35"]) == {
        "data_enc": "ascii",
        "len_enc": "bcd",
        "len_type": 1,
        "max_len": 37,
        "desc": "Track 2",
    }
    assert spec["h"]["max_len"] == 6
    assert spec["4"] == iso8583.specs.default_ascii["4"]
    assert iso8583.specs.default_ascii["2"]["max_len"] == 19
    with pytest.raises(TypeError):
        spec["2"]["max_len"] = 1  # type: ignore[index]


def test_a_description_that_is_a_list_still_loads_and_decodes(tmp_path: Path) -> None:
    """`desc` is free text to pyiso8583; YAML may make it a list or a mapping."""
    path = write(tmp_path, "base: default\nfields:\n  48: {desc: [free, text]}\n")
    spec = load_spec(str(path))
    assert list(spec["48"]["desc"]) == ["free", "text"]
    message = Message(Mti.parse("0800"), {"11": "000001", "48": "x"})
    assert decode(encode(message, spec), spec) == message


def test_yaml_without_base_and_relative_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        "fields:\n"
        "  t: {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 4}\n"
        "  p: {data_enc: b, len_enc: ascii, len_type: 0, max_len: 8}\n"
        "  11: {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 6}\n",
        name="mini.yml",
    )
    spec = load_spec("mini.yml", base_dir=tmp_path)
    assert set(spec) == {"h", "t", "p", "11"}
    assert spec["h"]["max_len"] == 0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "base: default\nfields:\n  2: {len_type: 7}\n",
            "len_type must be an integer 0..4 (field 2)",
        ),
        ("base: default\nfields:\n  2: {len_type: true}\n", "len_type"),
        (
            "base: default\nfields:\n  4: {max_len: -1}\n",
            "max_len must be an integer >= 0 (field 4)",
        ),
        ("base: default\nfields:\n  4: {max_len: '12'}\n", "max_len"),
        ("base: default\nfields:\n  4: {data_enc: nope}\n", "unknown data_enc (field 4)"),
        ("base: default\nfields:\n  4: {data_enc: base64}\n", "unknown data_enc (field 4)"),
        ("base: default\nfields:\n  2: {len_enc: bcdx}\n", "unknown len_enc (field 2)"),
        (
            "base: default\nfields:\n  2: {len_count: words}\n",
            "len_count must be bytes or nibbles (field 2)",
        ),
        (
            "base: default\nfields:\n  2: {left_pad: '00'}\n",
            "left_pad must be a single character (field 2)",
        ),
        (  # pyiso8583 took null for no pad, then failed on the first odd-length field
            "base: default\nfields:\n  2: {right_pad: null}\n",
            "right_pad must be a single character (field 2)",
        ),
        ("base: default\nfields:\n  2: {maxlen: 3}\n", "unknown attribute 'maxlen' (field 2)"),
        ("base: default\nfields:\n  2: 19\n", "definition must be a mapping (field 2)"),
        (
            "fields:\n  t: {data_enc: ascii, len_enc: ascii, len_type: 0}\n"
            "  p: {data_enc: b, len_enc: ascii, len_type: 0, max_len: 8}\n",
            "missing max_len (field t)",
        ),
        ("fields:\n  p: {data_enc: b, len_enc: ascii, len_type: 0, max_len: 8}\n", "(field t)"),
        ("base: default\nfields:\n  200: {max_len: 3}\n", "unknown field name '200'"),
        ("base: default\nfields:\n  2.5: {max_len: 3}\n", "field names must be"),
        ("base: default\nfields: [1, 2]\n", "'fields' must be a mapping"),
        ("base: default\n", "'fields' must be a mapping"),
        ("base: iso93\nfields: {}\n", "base must be one of"),
        ("- a\n- b\n", "expected a mapping"),
        ("base: default\nfields: {}\nextra: 1\n", "unknown top-level key 'extra'"),
    ],
)
def test_bad_spec_files(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_yaml_does_not_echo_the_contents(tmp_path: Path) -> None:
    path = write(tmp_path, "base: default\nfields: {2: [SECRET-TOKEN\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    message = str(info.value)
    assert "invalid YAML at line" in message
    assert str(path) in message
    assert "SECRET" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read") as info:
        load_spec("nowhere.yaml", base_dir=tmp_path)
    assert str(tmp_path / "nowhere.yaml") in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("ref", ["defualt", "iso93", "", "DEFAULT"])
def test_unknown_builtin(ref: str) -> None:
    with pytest.raises(SpecError, match="unknown spec"):
        load_spec(ref)
