"""The Kubernetes manifests agree with the code, for every service the code defines: ports,
the health names the probes ask for, the environment, the commands; and each overlay holds
together (its references resolve, prod's images are pinned)."""

import base64
import ipaddress
import json
import os
from importlib.util import find_spec

import pytest
import yaml

import suite_client
from services.runtime.auth import JwtAuthorizer, mint_token
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings
from tests.kubernetes_manifests import (
    BASE,
    DEPLOY,
    DEV_SIGNING_KEY,
    OVERLAYS,
    EnvSource,
    Manifest,
    container_environment,
    containers,
    environment_variables_read,
    find,
    pod_specs,
    render,
    resolved,
    server_container,
    server_pod_spec,
    server_workload,
    service_definitions,
)

SERVICES = pytest.mark.parametrize(
    "service", service_definitions(), ids=lambda definition: definition.name
)
EVERY_OVERLAY = pytest.mark.parametrize("overlay", sorted(OVERLAYS))


def test_the_base_has_one_manifest_per_service_the_code_defines():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    for definition in service_definitions():
        assert f"{definition.name}.yaml" in kustomization["resources"]


@SERVICES
def test_the_server_container_listens_on_the_service_port(service: ServiceDefinition):
    manifests = render(BASE)
    container = server_container(manifests, service.name)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": service.default_port, "metrics": service.default_metrics_port}
    config = container_environment(manifests, container)
    assert config["GRPC_PORT"].value == str(service.default_port)
    assert config["METRICS_PORT"].value == str(service.default_metrics_port)


@SERVICES
def test_prometheus_is_told_where_the_metrics_are(service: ServiceDefinition):
    workload = server_workload(render(BASE), service.name)
    assert workload["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(service.default_metrics_port),
        "prometheus.io/path": "/metrics",
    }


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, ...]:
    """The base with the optional ServiceMonitor component, as an overlay would add it."""
    folder = tmp_path_factory.mktemp("monitored")
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(BASE, folder)}\n"
        f"components:\n  - {os.path.relpath(BASE.parent / 'components/servicemonitor', folder)}\n"
    )
    return render(folder)


@SERVICES
def test_the_service_monitor_scrapes_the_services_metrics_port(
    service: ServiceDefinition, monitored: tuple[Manifest, ...]
):
    monitor = find(monitored, "ServiceMonitor", service.name)
    target = find(monitored, "Service", service.name)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= target["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in {port["name"] for port in target["spec"]["ports"]}


@SERVICES
def test_the_headless_service_serves_the_service_port(service: ServiceDefinition):
    spec = find(render(BASE), "Service", service.name)["spec"]
    assert spec["clusterIP"] == "None"
    ports = {port["name"]: port["port"] for port in spec["ports"]}
    assert ports == {"grpc": service.default_port, "metrics": service.default_metrics_port}


@SERVICES
def test_readiness_asks_health_for_the_grpc_service_and_liveness_for_the_server(
    service: ServiceDefinition,
):
    container = server_container(render(BASE), service.name)
    assert container["readinessProbe"]["grpc"] == {
        "port": service.default_port,
        "service": service.grpc_service,
    }
    assert container["livenessProbe"]["grpc"] == {"port": service.default_port, "service": ""}


@SERVICES
def test_every_variable_the_manifests_set_is_one_the_code_reads(service: ServiceDefinition):
    manifests = render(BASE)
    read = environment_variables_read(service.name)
    server = server_pod_spec(manifests, service.name)
    migration = find(manifests, "Job", f"{service.name}-migrate")["spec"]["template"]["spec"]
    for container in [*containers(server), *containers(migration)]:
        assert set(container_environment(manifests, container)) <= read, container["name"]


@SERVICES
def test_the_server_settings_parse_from_the_manifest(
    service: ServiceDefinition, monkeypatch: pytest.MonkeyPatch
):
    manifests = render(BASE)
    container = server_container(manifests, service.name)
    environment = container_environment(manifests, container)
    assert environment["DATABASE_URL"].secret == f"{service.name}-database"
    assert environment["PAGE_TOKEN_KEY"].secret == "page-token"  # one for the deployment
    for name, source in environment.items():
        # What a Secret would hold: long enough for the keys among them.
        monkeypatch.setenv(name, source.value or "postgresql://from-a-secret/db-" + "x" * 32)

    settings = Settings.from_environment(service.default_port)

    assert settings.port == service.default_port
    assert not settings.migrate_on_start
    pod = server_pod_spec(manifests, service.name)
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert settings.shutdown_drain_seconds > 0
    shutdown = pause + settings.shutdown_drain_seconds + settings.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > shutdown


@SERVICES
def test_every_container_runs_the_service_module(service: ServiceDefinition):
    manifests = render(BASE)
    server = server_pod_spec(manifests, service.name)
    migration = find(manifests, "Job", f"{service.name}-migrate")["spec"]["template"]["spec"]
    module = f"services.{service.name}"
    assert find_spec(f"{module}.__main__") is not None
    assert [c["args"] for c in server["containers"]] == [[module]]
    assert [c["args"] for c in server["initContainers"]] == [[module, "migrate"]]
    assert [c["args"] for c in migration["containers"]] == [[module, "migrate"]]
    for container in [*server["initContainers"], *migration["containers"]]:
        assert container_environment(manifests, container)["DATABASE_URL"].key == "owner-url"


@SERVICES
def test_disruption_budget_autoscaler_and_network_policy_target_the_server_pods(
    service: ServiceDefinition,
):
    manifests = render(BASE)
    workload = server_workload(manifests, service.name)
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    budget = find(manifests, "PodDisruptionBudget", service.name)["spec"]["selector"]
    policy = find(manifests, "NetworkPolicy", service.name)["spec"]
    autoscaler = find(manifests, "HorizontalPodAutoscaler", service.name)["spec"]
    assert budget["matchLabels"].items() <= pod_labels.items()
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/part-of"] == "video-pipeline"
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": workload["kind"],
        "name": service.name,
    }
    assert autoscaler["minReplicas"] == workload["spec"]["replicas"] == 2


@EVERY_OVERLAY
def test_every_pod_runs_as_non_root_on_a_read_only_root_without_privileges(overlay: str):
    for name, spec in pod_specs(render(OVERLAYS[overlay])):
        assert spec["securityContext"]["runAsNonRoot"], name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in containers(spec):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"], name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"], name
            assert container["resources"]["limits"], name


@EVERY_OVERLAY
def test_every_secret_and_config_map_a_pod_uses_is_in_the_overlay_or_documented(overlay: str):
    manifests = render(OVERLAYS[overlay])
    defined = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    # Prod's Secrets are made outside Kustomize; its kustomization.yaml says how.
    documented = (OVERLAYS[overlay] / "kustomization.yaml").read_text()
    for name, spec in pod_specs(manifests):
        for container in containers(spec):
            for source in container_environment(manifests, container).values():
                if source.secret and ("Secret", source.secret) not in defined:
                    assert f"secret generic {source.secret} " in documented, name
                    assert f"{source.key}=" in documented, name
                if source.config_map and ("ConfigMap", source.config_map) not in defined:
                    assert f"configmap {source.config_map} " in documented, name
                    assert f"{source.key}=" in documented, name
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined, name


def test_prod_pins_every_image_by_digest():
    for name, spec in pod_specs(render(OVERLAYS["prod"])):
        for container in containers(spec):
            assert "@sha256:" in container["image"], name


@SERVICES
def test_callers_service_config_balances_over_healthy_replicas(service: ServiceDefinition):
    config = json.loads((DEPLOY / f"grpc-service-config/{service.name}.json").read_text())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": service.grpc_service}
    for method in config.get("methodConfig", []):
        assert method["name"] == [{"service": service.grpc_service}]


@SERVICES
def test_callers_service_config_retries_as_the_suites_python_client_does(
    service: ServiceDefinition,
):
    """One retry policy: suite_client's, written out for callers in other languages."""
    config = json.loads((DEPLOY / f"grpc-service-config/{service.name}.json").read_text())
    [method] = config["methodConfig"]
    assert method["retryPolicy"] == suite_client.RetryPolicy().as_config()


def egress_rules(manifests: tuple[Manifest, ...], service: str) -> list[Manifest]:
    return find(manifests, "NetworkPolicy", f"{service}-egress")["spec"]["egress"]


def _ports(rule: Manifest) -> set[tuple[int, str]]:
    return {(port["port"], port["protocol"]) for port in rule.get("ports", [])}


@SERVICES
def test_the_egress_policy_holds_the_server_and_migration_pods(service: ServiceDefinition):
    manifests = render(BASE)
    policy = find(manifests, "NetworkPolicy", f"{service.name}-egress")["spec"]
    assert policy["policyTypes"] == ["Egress"]
    for workload in (
        server_workload(manifests, service.name),
        find(manifests, "Job", f"{service.name}-migrate"),
    ):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items(), workload["kind"]


@SERVICES
def test_every_service_may_reach_dns_in_kube_system_and_postgres(service: ServiceDefinition):
    rules = egress_rules(render(BASE), service.name)
    kube_system = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
    }
    (dns,) = (rule for rule in rules if rule.get("to") == [kube_system])
    assert _ports(dns) == {(53, "UDP"), (53, "TCP")}
    assert {"ports": [{"port": 5432, "protocol": "TCP"}]} in rules


@SERVICES
def test_a_service_reaches_exactly_the_suite_services_it_is_told_to_call(
    service: ServiceDefinition,
):
    manifests = render(BASE)
    environment = container_environment(manifests, server_container(manifests, service.name))
    ports = {definition.name: definition.default_port for definition in service_definitions()}
    called = {
        name.removesuffix("_TARGET").lower(): {(ports[name.removesuffix("_TARGET").lower()], "TCP")}
        for name in environment
        if name.endswith("_TARGET")
    }
    reached = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: _ports(rule)
        for rule in egress_rules(manifests, service.name)
        for peer in rule.get("to", [])
        if "podSelector" in peer
    }
    assert reached == called


@SERVICES
def test_only_the_publisher_reaches_outside_the_cluster_and_only_https_to_public_addresses(
    service: ServiceDefinition,
):
    outside = [
        rule
        for rule in egress_rules(render(BASE), service.name)
        if any("ipBlock" in peer for peer in rule.get("to", []))
    ]
    if service.name != "publisher":
        assert outside == []
        return
    (rule,) = outside
    assert _ports(rule) == {(443, "TCP")}
    blocks = [peer["ipBlock"] for peer in rule["to"]]

    def admitted(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(block["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
            for block in blocks
            if ipaddress.ip_network(block["cidr"]).version == ip.version
        )

    internal = ["10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1"]
    for address in [*internal, "fd00:ec2::254", "fe80::1"]:
        assert not admitted(address), address
    for address in ["93.184.216.34", "2606:4700::1111"]:
        assert admitted(address), address


@EVERY_OVERLAY
def test_no_deployment_trusts_any_postiz_host(overlay: str):
    manifests = render(OVERLAYS[overlay])
    assert "POSTIZ_TRUSTED_HOSTS" not in yaml.safe_dump_all(manifests)


def _holds_a_signing_key(text: str) -> bool:
    """A private key in PEM, or a JWK with its private part `d`."""
    if "PRIVATE KEY" in text:
        return True
    try:
        document = json.loads(text)
    except ValueError:
        return False
    keys = document.get("keys", [document]) if isinstance(document, dict) else []
    return any(isinstance(key, dict) and "d" in key for key in keys)


def _data_of(manifests: tuple[Manifest, ...], kind: str, name: str) -> list[str]:
    """The values of a Secret or ConfigMap the overlay defines (none if made outside it)."""
    values: list[str] = []
    for manifest in manifests:
        if manifest["kind"] != kind or manifest["metadata"]["name"] != name:
            continue
        data = manifest.get("data", {})
        if kind == "Secret":
            values += [base64.b64decode(value).decode(errors="replace") for value in data.values()]
        else:
            values += list(data.values())
        values += list(manifest.get("stringData", {}).values())
    return values


@EVERY_OVERLAY
def test_no_pod_gets_a_token_signing_key(overlay: str):
    """Services check tokens with public keys only: no pod may hold what mints them, neither
    an HS256 secret nor a private key, through its environment or its volumes."""
    manifests = render(OVERLAYS[overlay])
    for name, spec in pod_specs(manifests):
        seen: list[str] = []
        for container in containers(spec):
            environment = container_environment(manifests, container)
            assert not {"AUTH_JWT_SECRET", "AUTH_JWT_PRIVATE_KEY"} & set(environment), name
            for source in environment.values():
                if source.value is not None:
                    seen.append(source.value)
                elif source.secret is not None:
                    seen += _data_of(manifests, "Secret", source.secret)
                elif source.config_map is not None:
                    seen += _data_of(manifests, "ConfigMap", source.config_map)
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    seen += _data_of(manifests, "Secret", source["secretRef"]["name"])
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                seen += _data_of(manifests, "Secret", volume["secret"]["secretName"])
            if "configMap" in volume:
                seen += _data_of(manifests, "ConfigMap", volume["configMap"]["name"])
        assert not any(_holds_a_signing_key(value) for value in seen), name


@SERVICES
def test_every_service_checks_es256_tokens_meant_for_it_by_the_suites_issuer(
    service: ServiceDefinition,
):
    manifests = render(BASE)
    environment = container_environment(manifests, server_container(manifests, service.name))
    assert environment["AUTH_MODE"].value == "jwt"
    assert environment["AUTH_JWT_PUBLIC_KEY"] == EnvSource(config_map="auth-jwt", key="public-keys")
    assert environment["AUTH_JWT_AUDIENCE"].value == service.grpc_service
    assert environment["AUTH_JWT_ISSUER"].value == "video-pipeline"


def test_the_dev_public_keys_check_tokens_of_the_dev_signing_key():
    manifests = render(OVERLAYS["dev"])
    environment = container_environment(manifests, server_container(manifests, "jobs"))
    public_keys = resolved(manifests, environment["AUTH_JWT_PUBLIC_KEY"])
    settings = Settings(
        database_url="postgresql://unused",
        auth_mode="jwt",
        auth_jwt_public_key=public_keys,
        auth_jwt_audience="jobs.v1.JobService",
        auth_jwt_issuer="video-pipeline",
        page_token_key=resolved(manifests, environment["PAGE_TOKEN_KEY"]),
    )
    token = mint_token(
        DEV_SIGNING_KEY.read_text(),
        sub="dev",
        profiles=["store-1"],
        algorithm="ES256",
        key_id="dev",
        audience=["jobs.v1.JobService"],
        issuer="video-pipeline",
    )
    assert JwtAuthorizer.from_settings(settings).claims(token)["sub"] == "dev"


@EVERY_OVERLAY
def test_the_costs_spool_is_on_a_volume_that_outlives_the_pod(overlay: str):
    manifests = render(OVERLAYS[overlay])
    statefulset = find(manifests, "StatefulSet", "costs")
    container = server_container(manifests, "costs")
    spool_path = container_environment(manifests, container)["COSTS_SPOOL_PATH"].value
    assert spool_path is not None
    (mount,) = (m for m in container["volumeMounts"] if spool_path.startswith(m["mountPath"] + "/"))
    volumes = {v["name"] for v in statefulset["spec"]["template"]["spec"].get("volumes", [])}
    assert mount["name"] not in volumes  # not an emptyDir, nor any volume of the pod's own
    (claim,) = (
        c
        for c in statefulset["spec"]["volumeClaimTemplates"]
        if c["metadata"]["name"] == mount["name"]
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert statefulset["spec"]["serviceName"] == "costs"
    assert find(manifests, "Service", "costs")["spec"]["clusterIP"] == "None"


def test_the_costs_spool_cap_fits_its_volume():
    manifests = render(BASE)
    container = server_container(manifests, "costs")
    cap = int(container_environment(manifests, container)["COSTS_SPOOL_MAX_BYTES"].value or 0)
    (claim,) = find(manifests, "StatefulSet", "costs")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert 0 < cap <= 2**30 // 2  # the rest is room for the dead-letter file


def test_the_costs_pods_may_write_their_spool_volume_as_non_root():
    security = server_pod_spec(render(BASE), "costs")["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"]
