"""Config loading: the shipped file is valid, and every problem is reported by key path."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from codec import LengthPrefix
from proxy.config import load_config, parse_config
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_documented_defaults_apply() -> None:
    config = load_config(REPO / "config.yaml")
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 6000)
    assert config.listen.endpoint.framing.prefix is LengthPrefix.BINARY2
    assert config.listen.endpoint.framing.max_frame == 8192
    assert [s.name for s in config.switches] == ["alpha", "beta"]
    assert config.switches[0].connections == 2
    assert config.routing.strategy == "round_robin"
    assert config.routing.match_key == ("41", "11")


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(
        {"switches": [{"name": "a", "host": "127.0.0.1", "port": 7001}]}, base_dir=REPO
    )
    switch = config.switches[0]
    assert (switch.connections, switch.timeout, switch.tpdu) == (1, 20.0, None)
    assert switch.endpoint.spec_ref == "default"
    assert config.listen.port == 6000


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    raw = {
        "listen": {"port": 70000, "framing": "ascii2", "colour": "red"},
        "switches": [
            {"name": "a", "host": "127.0.0.1", "port": 7001, "timeout": -1},
            {"name": "a", "host": "", "port": "x", "tpdu": "zz"},
            {"host": "127.0.0.1", "port": 7003, "framing": "ascii4", "max_frame": 20000},
            {"name": "d", "host": "127.0.0.1", "port": 7004, "spec": "missing.yaml"},
        ],
        "routing": {"strategy": "random", "match_key": ["41", "41"]},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    problems = "\n".join(caught.value.problems)
    for path in (
        "listen.port:",
        "listen.framing:",
        "listen.colour: unknown key",
        "switches[0].timeout:",
        "switches[1].host:",
        "switches[1].port: must be int",
        "switches[1].tpdu:",
        "switches[1].name: duplicate switch name 'a'",
        "switches[2].name: is required",
        "switches[2].max_frame: must be between 16 and 9999",
        "switches[3].spec:",
        "routing.strategy:",
        "routing.match_key:",
    ):
        assert path in problems, path
    assert len(caught.value.problems) == 13


def test_duplicate_switch_names_and_empty_switch_list() -> None:
    same = {"host": "127.0.0.1", "port": 7001}
    with pytest.raises(ConfigError) as caught:
        parse_config({"switches": [{"name": "a", **same}, {"name": "a", **same}]}, base_dir=REPO)
    assert caught.value.problems == ["switches[1].name: duplicate switch name 'a'"]
    with pytest.raises(ConfigError) as caught:
        parse_config({"switches": []}, base_dir=REPO)
    assert caught.value.problems == ["switches: must be a non-empty list of switches"]


@pytest.mark.parametrize(
    ("match_key", "problem"),
    [
        (["11"], "must include 41 (terminal) and 11 (STAN): a STAN is unique per terminal only"),
        (["41", "11", "2"], "must not use card data fields (2)"),
        (["41", "11", "35", "52"], "must not use card data fields (35, 52)"),
        (["41", "11", "041"], "must not repeat a field"),
        (["41", "11", "x"], "fields must be data field numbers 2-128"),
        (["41", "11", "1"], "fields must be data field numbers 2-128"),
    ],
)
def test_match_key_rules(match_key: list[str], problem: str) -> None:
    raw = {"switches": [{"name": "a", "host": "h", "port": 1}], "routing": {"match_key": match_key}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=REPO)
    assert caught.value.problems == [f"routing.match_key: {problem}"]


def test_match_key_fields_are_normalised() -> None:
    raw = {
        "switches": [{"name": "a", "host": "h", "port": 1}],
        "routing": {"match_key": ["041", 11, "32"]},
    }
    assert parse_config(raw, base_dir=REPO).routing.match_key == ("41", "11", "32")


def test_specs_must_define_the_fields_the_proxy_uses(tmp_path: Path) -> None:
    (tmp_path / "thin.yaml").write_text(
        "fields:\n"
        "  t: {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 4}\n"
        "  p: {data_enc: b, len_enc: ascii, len_type: 0, max_len: 8}\n"
        "  '11': {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 6}\n"
    )
    raw = {"listen": {"spec": "thin.yaml"}, "switches": [{"name": "a", "host": "h", "port": 1}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.problems == ["listen.spec: must define fields 39, 41, 70"]


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(broken)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("log: {level: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(latin)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, check=False
    )


def test_check_config_command(tmp_path: Path) -> None:
    ok = _cli("check-config", "-c", str(REPO / "config.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "ok (2 switch(es))" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: -1}\nswitches: [{name: a, port: 99999}]\n")
    failed = _cli("check-config", "-c", str(bad))
    assert failed.returncode == 2
    assert "listen.port: must be between 0 and 65535" in failed.stderr
    assert "switches[0].host: is required" in failed.stderr
    assert "switches[0].port: must be between 1 and 65535" in failed.stderr

    refused = _cli("run", "-c", str(bad))
    assert refused.returncode == 2
    assert "switches[0].host: is required" in refused.stderr


def test_run_reports_a_port_in_use_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            f"listen: {{host: 127.0.0.1, port: {port}}}\nstore: {{enabled: false}}\n"
            "admin: {port: 0}\n"
            "switches: [{name: a, host: 127.0.0.1, port: 9, connect_timeout: 0.5}]\n"
        )
        result = _cli("run", "-c", str(config))
    assert result.returncode == 1
    assert "iso-proxy: " in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_sim_switch_refuses_a_bad_rc() -> None:
    result = _cli("sim-switch", "--port", "0", "--rc", "0")
    assert result.returncode == 2
    assert "a response code is 2 letters or digits" in result.stderr


def test_the_dsn_never_shows_in_a_repr_and_schemas_are_plain_lowercase() -> None:
    raw = {
        "switches": [{"name": "a", "host": "h", "port": 1}],
        "store": {"dsn": "postgresql://app:s3cr3t@db/iso", "schema": "iso_proxy"},
    }
    config = parse_config(raw, base_dir=REPO)
    assert "s3cr3t" not in repr(config)
    for schema in ("IsoProxy", "1st", "a-b", "x;drop"):
        with pytest.raises(ConfigError) as caught:
            parse_config({**raw, "store": {"schema": schema}}, base_dir=REPO)
        assert caught.value.problems[0].startswith("store.schema: must be a plain SQL")


def test_tls_profiles_and_limits_are_validated_with_their_key_paths(tmp_path: Path) -> None:
    raw = {
        "listen": {
            "tls": {"cert": "missing.pem", "min_version": "1.1", "handshake_timeout": 0},
            "max_connections_per_ip": 0,
            "idle_timeout": -1,
            "frame_timeout": "x",
        },
        "clients": [
            {"name": "a", "networks": ["10.0.0.1/8"], "allow": ["0210"]},
            {"name": "a", "allow": [200], "rate": {"burst": 5}, "rate_rc": "991"},
            {"name": "c", "cert_cn": "x.example", "allow": ["0201"]},
            {"name": "d", "networks": ["::ffff:10.0.0.0/104"], "allow": [], "rate_rc": "00"},
        ],
        "switches": [
            {"name": "s", "host": "127.0.0.1", "port": 7001, "tls": {"cert": "c.pem"}},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    problems = "\n".join(caught.value.problems)
    for expected in (
        "listen.tls.cert: no such file",
        "listen.tls.key: is required",
        "listen.tls.min_version: must be one of 1.2, 1.3",
        "listen.tls.handshake_timeout:",
        "listen.max_connections_per_ip:",
        "listen.idle_timeout:",
        "listen.frame_timeout: must be float",
        "clients[0].networks[0]: must be an address or network with its host bits zero",
        "clients[0].allow: 0210 is not an original request MTI",
        "clients[1].name: duplicate profile name 'a'",
        "clients[1]: needs networks, cert_cn or both",
        "clients[1].allow: must list MTIs as quoted 4-digit strings",
        "clients[1].rate.tps: is required",
        "clients[1].rate_rc:",
        "clients[2].allow: 0201 is not an original request MTI",
        "clients[2].cert_cn: needs mutual TLS (listen.tls.client_ca)",
        "clients[3].networks[0]: write IPv4-mapped networks as IPv4",
        "clients[3].allow: must list at least one MTI",
        "clients[3].rate_rc: must not be an approval (00)",
        "switches[0].tls: cert and key go together",
        "switches[0].tls.cert: no such file",
    ):
        assert expected in problems, expected


def test_an_unusable_certificate_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "listen: {tls: {cert: bad.pem, key: bad.pem}}\n"
        "switches: [{name: s, host: 127.0.0.1, port: 7001, tls: {ca: bad.pem}}]\n"
    )
    result = _cli("check-config", "-c", str(config))
    assert result.returncode == 2
    assert "listen.tls: cannot use certificate" in result.stderr
    assert "switches[0].tls.ca: cannot use CA file" in result.stderr
