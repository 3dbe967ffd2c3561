"""The kbproxy Helm chart: rendered by Helm's own engine, linted, and every manifest validated
against the Kubernetes schemas (kubernetes-validate), with the properties the deployment needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kbproxy.cli import build_parser

CHART = Path(__file__).resolve().parents[2] / "packaging" / "helm" / "kbproxy"
KUBE_VERSION = "1.31.0"
# Set by the Deployment template from `ports` and `drain`, not from `env`.
DERIVED_ENV = {"KBPROXY_LISTEN", "KBPROXY_STATS_LISTEN", "KBPROXY_DRAIN_GRACE"}


def helm() -> Any:
    try:
        import helm_python
    except ImportError:
        pytest.fail("helm-python-sdk renders the chart offline: pip install -e '.[test]'")
    return helm_python


def render(values: dict[str, Any] | None = None, namespace: str = "spark") -> dict[str, Any]:
    """Render the chart; {kind: manifest}, every manifest of a distinct kind."""
    manifests = helm().Chart.load(CHART).render(values, name="kbproxy", namespace=namespace)
    docs = [
        doc
        for text in manifests.values()
        for doc in yaml.safe_load_all(text)
        if doc  # templates switched off render to nothing
    ]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def serve_flags() -> set[str]:
    """The long flags of `kbproxy serve`, without --help and the --no-* negations."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = sub.choices["serve"]  # type: ignore[index]
    flags = set()
    for action in serve._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help" and not option.startswith("--no-"):
                flags.add(option)
    return flags


def test_chart_lints_clean() -> None:
    report = helm().lint(str(CHART), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert report["messages"] == []


@pytest.mark.parametrize(
    "values",
    [
        None,
        {"ingress": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
        {"networkPolicy": {"allowOtherPorts": False, "sparkNamespace": "users"}},
    ],
)
def test_every_manifest_matches_the_kubernetes_schema(values: dict[str, Any] | None) -> None:
    docs = render(values)
    for doc in docs.values():
        validate(doc)
    assert {"Deployment", "Service", "ServiceAccount", "NetworkPolicy"} <= set(docs)


def test_deployment_drains_and_probes() -> None:
    deployment = render()["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}

    assert spec["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "stats"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "stats"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["KBPROXY_STATS_LISTEN"] == f"0.0.0.0:{ports['stats']}"
    assert env["KBPROXY_LISTEN"] == f"0.0.0.0:{ports['grpc']}"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["KBPROXY_DRAIN_GRACE"])
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert env["KBPROXY_NAMESPACE"] == "spark"  # the release namespace by default


def test_every_kbproxy_flag_is_a_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    expected = {"KBPROXY_" + f[2:].upper().replace("-", "_") for f in serve_flags()}
    assert expected - DERIVED_ENV == set(values["env"]), (
        "values.yaml env and `kbproxy serve` differ"
    )

    container = render({"env": {"KBPROXY_TLS_CERT": "/tls/tls.crt", "KBPROXY_TLS_KEY": "/tls/k"}})[
        "Deployment"
    ]["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    assert {"KBPROXY_TLS_CERT", "KBPROXY_TLS_KEY"} <= set(names)
    assert "KBPROXY_TLS_CERT" not in {
        e["name"]
        for e in render()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }  # empty: unset


def test_ingress_speaks_grpc_with_tls_and_long_streams() -> None:
    ingress = render()["Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert ingress["spec"]["tls"][0]["hosts"] == ["spark.berdl.kbase.us"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "kbproxy", "port": {"name": "grpc"}}


def test_network_policy_admits_only_the_proxy_to_15002() -> None:
    docs = render({"networkPolicy": {"sparkNamespace": "users"}})
    policy = docs["NetworkPolicy"]
    proxy_labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["metadata"]["namespace"] == "users"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]

    def admits(rule: dict[str, Any], port: int) -> bool:
        return any(
            p["protocol"] == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
            for p in rule["ports"]
        )

    to_spark = [r for r in rules if admits(r, 15002)]
    assert len(to_spark) == 1
    (peer,) = to_spark[0]["from"]
    assert peer["podSelector"]["matchLabels"] == proxy_labels
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "spark"}
    assert admits(rules[1], 4040) and admits(rules[1], 15003) and "from" not in rules[1]

    strict = render({"networkPolicy": {"allowOtherPorts": False}})["NetworkPolicy"]
    assert len(strict["spec"]["ingress"]) == 1


def test_pod_disruption_budget_keeps_replicas() -> None:
    docs = render()
    pdb = docs["PodDisruptionBudget"]
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    )
    assert pdb["spec"]["maxUnavailable"] < docs["Deployment"]["spec"]["replicas"]


def test_schema_validation_would_catch_a_mistake() -> None:
    """The validator is not a rubber stamp: a misspelt field fails."""
    import kubernetes_validate

    deployment = render()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_kbproxy_accepts_the_rendered_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Deployment's variables, parsed by `kbproxy serve` itself, give the intended settings."""
    from kbproxy.cli import settings_from_args

    container = render()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item["value"])

    args = build_parser().parse_args(container["args"])
    assert args.env_errors == []
    settings = settings_from_args(args)

    assert settings.listen == ("0.0.0.0", 15002)
    assert settings.stats_listen == ("0.0.0.0", 9090)
    assert settings.namespace == "spark"
    assert settings.require_mfa is True
    assert settings.drain_grace == 25
    assert settings.auth_url == "https://kbase.us/services/auth/"
