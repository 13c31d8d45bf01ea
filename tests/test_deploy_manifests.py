"""The deployment files agree with the server and with each other (no cluster or Docker engine runs here).

deploy/k8s: the container's arguments are valid `duplex serve` flags; the probes use /readyz and /healthz on
the port the image serves; the grace period covers the preStop pause plus the drain; every Service port
names a container port; a GPU is requested. Dockerfile: it copies every package the wheel is built from,
runs `duplex serve` as PID 1 (so SIGTERM starts the drain) as the user the manifests expect. pyproject: every
Python package folder is in the wheel (a missing one breaks the image, not the editable install)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from duplex.cli import build_parser
from duplex.server.cli import settings_from_args

ROOT = Path(__file__).resolve().parents[1]
STOP_MARGIN_S = 10  # after the drain: end the calls, close the engine process, exit


def k8s_documents() -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile(), re.MULTILINE)
    assert match, "the Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def pod() -> dict:
    deployments = k8s_documents()["Deployment"]
    assert len(deployments) == 1
    return deployments[0]["spec"]["template"]


def test_the_container_arguments_are_valid_serve_flags(pod):
    container = pod["spec"]["containers"][0]
    argv = entrypoint()[1:] + container["args"]  # ENTRYPOINT ["duplex", "serve", ...] + args
    args = build_parser(argv).parse_args(argv)
    settings = settings_from_args(args, environ={})
    assert args.port == 8998 and args.host == "0.0.0.0"
    assert settings.shutdown_drain_seconds > 0 and settings.metrics_port == 9100


def test_probes_ports_and_grace_period_match_the_server(pod):
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    argv = entrypoint()[1:] + container["args"]
    args = build_parser(argv).parse_args(argv)
    assert ports == {"http": args.port, "metrics": args.metrics_port}
    exposed = {int(p) for p in re.search(r"^EXPOSE\s+(.+)$", dockerfile(), re.MULTILINE).group(1).split()}
    assert set(ports.values()) <= exposed
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    needed = float(pause[1]) + args.drain_seconds + STOP_MARGIN_S
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed, "SIGKILL would cut the drain short"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_service_port_names_a_container_port_of_the_selected_pods(pod):
    labels = pod["metadata"]["labels"]
    names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    services = k8s_documents()["Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_the_image_runs_serve_as_pid_1_as_the_manifests_user(pod):
    assert entrypoint()[:2] == ["duplex", "serve"]  # exec form: SIGTERM reaches the server itself
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile(), re.MULTILINE)
    user = re.search(r"^USER (\d+)", dockerfile(), re.MULTILINE).group(1)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)
    health = re.search(r"^\s+CMD (\[.*\])$", dockerfile(), re.MULTILINE).group(1)
    assert "/healthz" in health and ":8998/" in health


def test_the_image_copies_every_package_of_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = set()
    for line in dockerfile().splitlines():
        if line.startswith("COPY "):
            copied.update(shlex.split(line)[1:-1])
    assert set(tool["package-dir"].values()) <= copied


def test_every_package_folder_is_in_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found == set(tool["packages"]), "pyproject [tool.setuptools] packages must list every package"
