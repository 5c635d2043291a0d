"""What the deployment tests compare: the services the code defines and the Kubernetes objects
each Kustomize overlay renders."""

import ast
import base64
import functools
import importlib
import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.runtime.server import ServiceDefinition

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s/base"
OVERLAYS = {path.name: path for path in sorted((DEPLOY / "k8s/overlays").iterdir())}
KUBECTL = str(Path(sys.executable).parent / "kubectl")
# The private half of the dev overlay's throwaway token key pair: in no Kubernetes object.
DEV_SIGNING_KEY = OVERLAYS["dev"] / "auth-jwt-dev-signing-key.pem"

Manifest = dict[str, Any]


def _definition_in(module_name: str) -> ServiceDefinition:
    """The one ServiceDefinition a `service.py` holds, or makes with a call without arguments."""
    module = importlib.import_module(module_name)
    found = [value for value in vars(module).values() if isinstance(value, ServiceDefinition)]
    if not found:
        found = [
            value()
            for value in vars(module).values()
            if inspect.isfunction(value)
            and value.__module__ == module_name
            and inspect.signature(value).return_annotation
            in (ServiceDefinition, "ServiceDefinition")
        ]
    assert len(found) == 1, f"{module_name} should define one service, found {found}"
    return found[0]


@functools.cache
def service_definitions() -> tuple[ServiceDefinition, ...]:
    """Every service in the code: one per `services/<name>/service.py`."""
    return tuple(
        _definition_in(f"services.{path.parent.name}.service")
        for path in sorted((REPO / "services").glob("*/service.py"))
    )


@functools.cache
def render(kustomization: Path) -> tuple[Manifest, ...]:
    """The objects `kubectl kustomize` makes of a kustomization folder."""
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(document for document in yaml.safe_load_all(rendered) if document)


def find(manifests: tuple[Manifest, ...], kind: str, name: str) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_specs(manifests: tuple[Manifest, ...]) -> list[tuple[str, Manifest]]:
    """(kind/name, pod spec) of every object that makes pods."""
    return [
        (f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"])
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "Job")
    ]


def containers(pod_spec: Manifest) -> list[Manifest]:
    """A pod's init containers and containers."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def server_workload(manifests: tuple[Manifest, ...], service: str) -> Manifest:
    """The service's Deployment, or StatefulSet where it keeps state on disk (Costs)."""
    matches = [
        m
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet") and m["metadata"]["name"] == service
    ]
    assert len(matches) == 1, f"expected one Deployment or StatefulSet {service}"
    return matches[0]


def server_pod_spec(manifests: tuple[Manifest, ...], service: str) -> Manifest:
    return server_workload(manifests, service)["spec"]["template"]["spec"]


def server_container(manifests: tuple[Manifest, ...], service: str) -> Manifest:
    spec = server_pod_spec(manifests, service)
    (container,) = (c for c in spec["containers"] if c["name"] == "server")
    return container


@dataclass(frozen=True)
class EnvSource:
    """Where one environment variable of a container comes from."""

    value: str | None = None
    secret: str | None = None
    key: str | None = None
    config_map: str | None = None  # with `key`: a configMapKeyRef


def container_environment(
    manifests: tuple[Manifest, ...], container: Manifest
) -> dict[str, EnvSource]:
    """A container's variables, from its `envFrom` ConfigMaps and Secrets and its `env`."""
    environment: dict[str, EnvSource] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = find(manifests, "ConfigMap", source["configMapRef"]["name"])["data"]
            environment |= {name: EnvSource(value=value) for name, value in data.items()}
        else:
            secret_name = source["secretRef"]["name"]
            data = find(manifests, "Secret", secret_name).get("data", {})
            environment |= {name: EnvSource(secret=secret_name, key=name) for name in data}
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = EnvSource(value=variable["value"])
        elif "configMapKeyRef" in variable["valueFrom"]:
            reference = variable["valueFrom"]["configMapKeyRef"]
            environment[variable["name"]] = EnvSource(
                config_map=reference["name"], key=reference["key"]
            )
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            environment[variable["name"]] = EnvSource(
                secret=reference["name"], key=reference["key"]
            )
    return environment


def resolved(manifests: tuple[Manifest, ...], source: EnvSource) -> str:
    """The variable's value, read from its Secret or ConfigMap if it comes from one."""
    if source.config_map is not None:
        assert source.key is not None
        return find(manifests, "ConfigMap", source.config_map)["data"][source.key]
    if source.secret is None:
        assert source.value is not None
        return source.value
    assert source.key is not None
    secret = find(manifests, "Secret", source.secret)
    if source.key in secret.get("stringData", {}):
        return secret["stringData"][source.key]
    return base64.b64decode(secret["data"][source.key]).decode()


# Calls that read a variable take its name first: os.environ.get(NAME), os.getenv(NAME) and
# helpers such as _int(NAME, default); os.environ[NAME] is a subscript.
def _names_read_in(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        candidate = None
        if isinstance(node, ast.Call) and node.args:
            candidate = node.args[0]
        elif isinstance(node, ast.Subscript):
            candidate = node.slice
        if (
            isinstance(candidate, ast.Constant)
            and isinstance(candidate.value, str)
            and candidate.value.isupper()
            and candidate.value.isidentifier()
        ):
            names.add(candidate.value)
    return names


def environment_variables_read(service: str) -> set[str]:
    """Upper-case names the shared runtime or the service's own code reads."""
    files = [
        *(REPO / "services/runtime").rglob("*.py"),
        *(REPO / "services" / service).rglob("*.py"),
    ]
    return set().union(*(_names_read_in(path.read_text()) for path in files))
