"""The Helm chart `helm/bace-token-broker`: lint, render, Kubernetes schemas, and the broker's
own verdict on the config the chart renders.

Helm runs in-process through `helm-python-sdk` (Helm v4's Go SDK behind a C ABI: no helm
binary, no cluster, no network). Every rendered object is validated against the Kubernetes
1.30 JSON schemas that `kubernetes-validate` ships in its wheel (strict: unknown fields are
errors); the ServiceMonitor is a CRD, so its fields are asserted by hand instead.

The cases are the chart defaults plus one account, and the values files under
`tests/helm/values/`. The broker binary (`BROKER_BIN`, default target/debug/bace-token-broker)
runs `check-config` on each rendered config, with the mounted secret files created in a temp
dir at the paths the config names.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "bace-token-broker"
VALUES_DIR = REPO_ROOT / "tests" / "helm" / "values"
KUBE_VERSION = "1.30.0"
RELEASE = "tb"
NAMESPACE = "bace"
FULLNAME = "tb-bace-token-broker"
SECRETS_DIR = "/var/run/secrets/bace"
CONFIG_PATH = "/etc/bace-token-broker/config.yaml"
READINESS_SERVICE = "bace.tokenbroker.v1.TokenBrokerService"
# What the broker runs as: distroless `nonroot` (the Dockerfile's USER).
NONROOT = 65532

ONE_ACCOUNT: dict[str, Any] = {
    "accounts": {
        "fleet-a": {
            "clientId": "fleet-a-client",
            "username": "ops@example.com",
            "existingSecret": "bace-fleet-a",
        }
    }
}


def _broker_bin() -> Path:
    if env := os.environ.get("BROKER_BIN"):
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "debug" / "bace-token-broker"


def _load_values_file(name: str) -> dict[str, Any]:
    # Helm's own YAML reading, as `helm template -f FILE` would do it.
    return helm.values_from_yaml((VALUES_DIR / name).read_text())


CASES: dict[str, dict[str, Any]] = {"defaults": ONE_ACCOUNT}
CASES.update({p.stem: _load_values_file(p.name) for p in sorted(VALUES_DIR.glob("*.yaml"))})
EXPECTED_FILES = {
    "existing-secret",
    "inline",
    "metrics-off",
    "networkpolicy-on",
    "servicemonitor-on",
}


# === helpers ===


class Rendered:
    """A render's objects by (kind, name), plus NOTES.txt."""

    def __init__(self, manifests: dict[str, str]):
        self.notes = ""
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        for path, text in manifests.items():
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc is None:
                    continue
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in self.objects, f"{key} rendered twice"
                self.objects[key] = doc

    def get(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        assert (kind, name) in self.objects, f"no {kind}/{name} in {sorted(self.objects)}"
        return self.objects[(kind, name)]

    def kinds(self) -> list[str]:
        return sorted(kind for kind, _ in self.objects)

    @property
    def deployment(self) -> dict[str, Any]:
        return self.get("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def broker(self) -> dict[str, Any]:
        (container,) = self.pod_spec["containers"]
        return container

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_text)

    @property
    def config_text(self) -> str:
        return self.get("ConfigMap")["data"]["config.yaml"]


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as c:
        yield c


def render(chart, values: dict[str, Any]) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


def render_error(chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(excinfo.value)


def with_account(**overrides: Any) -> dict[str, Any]:
    values = {"accounts": {"fleet-a": dict(ONE_ACCOUNT["accounts"]["fleet-a"])}}
    values.update(overrides)
    return values


def humantime_seconds(text: str) -> float:
    """The few humantime forms the tests use (`10s`, `1m 15s`)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    assert parts and re.fullmatch(r"(\s*\d+\s*[a-z]+)+\s*", text), text
    return sum(int(n) * units[u] for n, u in parts)


def inline_secrets(values: dict[str, Any]) -> list[str]:
    return [
        a[k]
        for a in values.get("accounts", {}).values()
        for k in ("clientSecret", "password")
        if k in a
    ]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, chart) -> tuple[str, dict[str, Any], Rendered]:
    values = CASES[request.param]
    return request.param, values, render(chart, values)


# === lint, values, schema ===


def test_values_files_present():
    assert EXPECTED_FILES <= set(CASES), sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_helm_lint_strict_clean(name):
    report = helm.lint(
        CHART_DIR, CASES[name], strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity: 1 info, 2 warning, 3 error. Only "icon is recommended" (info) may remain.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_every_value_documented():
    """Every key in values.yaml has a `# --` comment, on itself or on an enclosing key."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    documented_at: list[tuple[int, bool]] = []  # stack of (indent, documented)
    comment_block: list[str] = []
    missing = []
    path: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped:
            comment_block = []
            continue
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            comment_block = []
            continue  # list items and the like, inside a documented value
        indent = len(m.group(1))
        while documented_at and documented_at[-1][0] >= indent:
            documented_at.pop()
            path.pop()
        own = any(c.startswith("# --") for c in comment_block)
        inherited = any(d for _, d in documented_at)
        documented_at.append((indent, own or inherited))
        path.append(m.group(2))
        comment_block = []
        # A parent key (nothing after the colon) may go without: its leaves carry the comments.
        leaf_value = line.split(":", 1)[1].strip()
        if not (own or inherited) and leaf_value:
            missing.append(".".join(path))
    assert missing == [], f"values without a `# --` comment: {missing}"


def test_schema_matches_values(chart):
    schema = chart.schema
    assert schema is not None
    defaults = chart.values
    top = set(schema["properties"]) - {"global"}
    assert set(defaults) == top, (
        f"values.yaml and values.schema.json disagree: only in values {set(defaults) - top}, "
        f"only in schema {top - set(defaults)}"
    )
    for key in ("image", "service", "metrics", "serviceMonitor", "networkPolicy"):
        sub = schema["properties"][key]["properties"]
        assert set(defaults[key]) <= set(sub), (key, set(defaults[key]) - set(sub))
    for values in CASES.values():
        chart.validate_schema(values)


def test_image_tag_defaults_to_app_version(chart):
    app_version = chart.metadata["appVersion"]
    cargo = (REPO_ROOT / "Cargo.toml").read_text()
    cargo_version = re.search(r'^version\s*=\s*"([^"]+)"', cargo, re.M).group(1)
    assert app_version == cargo_version, "keep Chart.yaml appVersion equal to Cargo.toml version"
    r = render(chart, ONE_ACCOUNT)
    assert r.broker["image"] == f"bace-token-broker:{app_version}"
    r = render(chart, CASES["existing-secret"])
    assert r.broker["image"] == "registry.example.com/platform/bace-token-broker:0.1.0-rc.1"


# === every case: objects, schemas, invariants ===


def test_objects_valid_against_kubernetes_schemas(case):
    name, values, r = case
    for (kind, obj_name), obj in r.objects.items():
        if kind == "ServiceMonitor":
            continue  # a CRD: checked in test_service_monitor
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {kind}/{obj_name} invalid for Kubernetes {KUBE_VERSION}: {e}")
        assert obj["metadata"]["namespace"] == NAMESPACE
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "bace-token-broker"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_rendered_object_set(case):
    name, values, r = case
    expected = ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"]
    if any("existingSecret" not in a for a in values["accounts"].values()):
        expected.append("Secret")
    if values.get("networkPolicy", {}).get("enabled"):
        expected.append("NetworkPolicy")
    if values.get("podDisruptionBudget", {}).get("enabled"):
        expected.append("PodDisruptionBudget")
    if values.get("serviceMonitor", {}).get("enabled"):
        expected.append("ServiceMonitor")
    assert r.kinds() == sorted(expected)
    assert "helm test" in r.notes and "port-forward" in r.notes


def test_probes(case):
    _, values, r = case
    port = values.get("service", {}).get("port", 50051)
    c = r.broker
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert c["startupProbe"]["grpc"] == {"port": port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": READINESS_SERVICE}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert set(c[probe]) - {"grpc"} <= {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "initialDelaySeconds",
            "successThreshold",
        }
    # The startup probe gives the server at least a minute to listen.
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 60


def test_security_contexts(case):
    _, _, r = case
    pod = r.pod_spec
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == NONROOT and psc["runAsGroup"] == NONROOT
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == FULLNAME
    assert r.get("ServiceAccount")["automountServiceAccountToken"] is False
    sc = r.broker["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == NONROOT
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    test_pod = r.get("Pod", f"{FULLNAME}-test-readiness")
    (probe,) = test_pod["spec"]["containers"]
    assert probe["securityContext"]["readOnlyRootFilesystem"] is True
    assert test_pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_resources_requests_and_limits(case):
    _, _, r = case
    res = r.broker["resources"]
    assert {"cpu", "memory"} <= set(res["requests"])
    assert {"cpu", "memory"} <= set(res["limits"])


def test_args_and_config_mount(case):
    _, _, r = case
    c = r.broker
    assert c["args"] == ["--log-format", "json", "serve", "--config", CONFIG_PATH]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["config"]["mountPath"] == os.path.dirname(CONFIG_PATH)
    assert mounts["config"]["readOnly"] is True
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == FULLNAME
    assert "config.yaml" in r.get("ConfigMap")["data"]


def test_secret_files_are_mounted_where_the_config_points(case):
    """Each account's *_file paths resolve to an item of a read-only Secret volume mount, and that
    Secret is the existingSecret or the chart's own Secret holding the right keys."""
    _, values, r = case
    config = r.config
    mounts = {m["mountPath"]: m for m in r.broker["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert set(config["accounts"]) == set(values["accounts"])
    for account, acc in config["accounts"].items():
        spec = values["accounts"][account]
        assert acc["client_id"] == spec["clientId"] and acc["username"] == spec["username"]
        assert set(acc) <= {"client_id", "username", "client_secret_file", "password_file", "token_url"}
        assert acc.get("token_url") == spec.get("tokenUrl")
        for field, value_key in (("client_secret_file", "clientSecret"), ("password_file", "password")):
            path = acc[field]
            directory, filename = os.path.split(path)
            assert directory == f"{SECRETS_DIR}/{account}"
            mount = mounts[directory]
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            assert secret["defaultMode"] == 0o440
            (item,) = [i for i in secret["items"] if i["path"] == filename]
            if "existingSecret" in spec:
                assert secret["secretName"] == spec["existingSecret"]
                assert item["key"] == filename  # keys client_secret and password
            else:
                assert secret["secretName"] == f"{FULLNAME}-credentials"
                data = r.get("Secret", f"{FULLNAME}-credentials")["data"]
                assert base64.b64decode(data[item["key"]]).decode() == spec[value_key]


def test_no_secret_values_in_configmap_or_env(case):
    _, values, r = case
    secrets = inline_secrets(values)
    config_text = r.config_text
    for account in r.config["accounts"].values():
        assert "client_secret" not in account and "password" not in account
    containers = r.pod_spec["containers"] + r.pod_spec.get("initContainers", [])
    for c in containers:
        assert "env" not in c and "envFrom" not in c, c["name"]
    for (kind, name), obj in r.objects.items():
        if kind == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for s in secrets:
            assert s not in text, f"an inline secret leaked into {kind}/{name}"
    for s in secrets:
        assert s not in config_text and s not in r.notes


def test_checksum_annotations(case):
    _, _, r = case
    ann = r.deployment["spec"]["template"]["metadata"]["annotations"]
    for key in ("checksum/config", "checksum/secret"):
        assert re.fullmatch(r"[0-9a-f]{64}", ann[key]), (key, ann.get(key))


def test_service_ports(case):
    _, values, r = case
    metrics = values.get("metrics", {})
    metrics_on = metrics.get("enabled", True)
    svc = r.get("Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    grpc = ports["grpc"]
    assert grpc["appProtocol"] == "grpc" and grpc["targetPort"] == "grpc"
    assert grpc["port"] == values.get("service", {}).get("port", 50051)
    container_ports = {p["name"]: p["containerPort"] for p in r.broker["ports"]}
    assert container_ports["grpc"] == grpc["port"]
    config = r.config
    assert config["listen"] == f"0.0.0.0:{grpc['port']}"
    if metrics_on:
        port = metrics.get("port", 9090)
        assert set(ports) == {"grpc", "metrics"}
        assert ports["metrics"]["port"] == port and ports["metrics"]["targetPort"] == "metrics"
        assert container_ports["metrics"] == port
        assert config["metrics_listen"] == f"0.0.0.0:{port}"
    else:
        assert set(ports) == {"grpc"} and set(container_ports) == {"grpc"}
        assert config["metrics_listen"] == "", "empty turns the broker's metrics listener off"
    selector = svc["spec"]["selector"]
    pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert selector == r.deployment["spec"]["selector"]["matchLabels"]
    test_labels = r.get("Pod", f"{FULLNAME}-test-readiness")["metadata"]["labels"]
    assert not selector.items() <= test_labels.items(), "the Service must not select the test pod"


def test_termination_grace_above_drain_grace(case):
    _, values, r = case
    grace = humantime_seconds(values.get("config", {}).get("shutdown_grace", "10s"))
    assert r.pod_spec["terminationGracePeriodSeconds"] > grace


def test_helm_test_pod(case):
    _, values, r = case
    pod = r.get("Pod", f"{FULLNAME}-test-readiness")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "ghcr.io/grpc-ecosystem/grpc-health-probe:v0.4.53"
    port = values.get("service", {}).get("port", 50051)
    assert f"-addr={FULLNAME}:{port}" in c["args"]
    assert f"-service={READINESS_SERVICE}" in c["args"]


def test_broker_check_config_accepts_rendered_config(case, tmp_path):
    """`bace-token-broker check-config` accepts the rendered config once the mounted secret
    files exist (here under a temp dir standing in for /var/run/secrets/bace)."""
    name, values, r = case
    binary = _broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    root = tmp_path / "secrets"
    text = r.config_text
    assert SECRETS_DIR in text
    text = text.replace(SECRETS_DIR + "/", f"{root}/")
    config = yaml.safe_load(text)
    for account, acc in config["accounts"].items():
        spec = values["accounts"][account]
        for field, value_key in (("client_secret_file", "clientSecret"), ("password_file", "password")):
            path = Path(acc[field])
            assert path.is_relative_to(root)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Kubernetes writes the Secret's bytes as they are; give a trailing newline as
            # `kubectl create secret --from-file` often does.
            path.write_text(spec.get(value_key, f"{account}-{value_key}-from-secret") + "\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    proc = subprocess.run(
        [str(binary), "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{name}: check-config refused the rendered config:\n{proc.stderr}\n{text}"
    assert f"{len(values['accounts'])} account(s)" in proc.stdout


# === specific values ===


def test_config_merged(chart):
    values = CASES["existing-secret"]
    config = render(chart, values).config
    for key, value in values["config"].items():
        assert config[key] == value


def test_network_policy(chart):
    values = CASES["networkpolicy-on"]
    r = render(chart, values)
    np = r.get("NetworkPolicy")["spec"]
    assert np["podSelector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    assert sorted(np["policyTypes"]) == ["Egress", "Ingress"]
    grpc_rule, metrics_rule = np["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    allowed = values["networkPolicy"]["allowedClients"]
    assert grpc_rule["from"][: len(allowed)] == allowed
    # ... and the helm test pod.
    (test_peer,) = grpc_rule["from"][len(allowed) :]
    test_labels = r.get("Pod", f"{FULLNAME}-test-readiness")["metadata"]["labels"]
    assert test_peer["podSelector"]["matchLabels"].items() <= test_labels.items()
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == [
        {"namespaceSelector": values["networkPolicy"]["metricsNamespaceSelector"]}
    ]
    egress_ports = sorted(
        (p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"]
    )
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")]
    assert all(set(rule) == {"ports"} for rule in np["egress"])
    pdb = r.get("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    assert r.deployment["spec"]["replicas"] == 2


def test_network_policy_without_metrics_has_no_metrics_rule(chart):
    values = dict(CASES["networkpolicy-on"], metrics={"enabled": False, "port": 9090})
    np = render(chart, values).get("NetworkPolicy")["spec"]
    assert [rule["ports"][0]["port"] for rule in np["ingress"]] == ["grpc"]


def test_service_monitor(chart):
    values = CASES["servicemonitor-on"]
    r = render(chart, values)
    sm = r.get("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = sm["spec"]
    assert spec["selector"]["matchLabels"] == r.get("Service")["spec"]["selector"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}
    ]
    assert set(r.get("Service")["metadata"]["labels"].items()) >= set(
        spec["selector"]["matchLabels"].items()
    )


def test_checksums_follow_config_and_secret(chart):
    base = CASES["inline"]
    r0 = render(chart, base)
    ann = lambda r: r.deployment["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    changed_config = dict(base, config={"invalidate_cooldown": "30s"})
    r1 = render(chart, changed_config)
    assert ann(r1)["checksum/config"] != ann(r0)["checksum/config"]
    assert ann(r1)["checksum/secret"] == ann(r0)["checksum/secret"]
    accounts = {k: dict(v) for k, v in base["accounts"].items()}
    accounts["fleet-a"]["password"] = "rotated-password"
    r2 = render(chart, dict(base, accounts=accounts))
    assert ann(r2)["checksum/secret"] != ann(r0)["checksum/secret"]
    assert ann(r2)["checksum/config"] == ann(r0)["checksum/config"]


@pytest.mark.parametrize(
    ("shutdown_grace", "explicit", "expected"),
    [
        (None, None, 30),
        ("1m 30s", None, 110),
        ("45s", None, 65),
        ("1500ms", None, 22),
        (None, 12, 12),
        ("2m", 200, 200),
    ],
)
def test_termination_grace_period(chart, shutdown_grace, explicit, expected):
    values = with_account()
    if shutdown_grace is not None:
        values["config"] = {"shutdown_grace": shutdown_grace}
    if explicit is not None:
        values["terminationGracePeriodSeconds"] = explicit
    assert render(chart, values).pod_spec["terminationGracePeriodSeconds"] == expected


# === bad values fail with a clear message ===

_ACCOUNT = ONE_ACCOUNT["accounts"]["fleet-a"]
_NO_SECRET = {"clientId": "c", "username": "u"}

BAD_VALUES = [
    ("no accounts", {}, "accounts: at least one account is required"),
    ("empty accounts", {"accounts": {}}, "accounts: at least one account is required"),
    (
        "no credentials",
        {"accounts": {"fleet-a": _NO_SECRET}},
        "accounts.fleet-a: credentials missing: set existingSecret",
    ),
    (
        "both kinds of credentials",
        {"accounts": {"fleet-a": dict(_ACCOUNT, clientSecret="s", password="p")}},
        "accounts.fleet-a: give either existingSecret or clientSecret+password, not both",
    ),
    (
        "half the inline credentials",
        {"accounts": {"fleet-a": dict(_NO_SECRET, clientSecret="s")}},
        "accounts.fleet-a: inline credentials need both clientSecret and password",
    ),
    (
        "no clientId",
        {"accounts": {"fleet-a": {"username": "u", "existingSecret": "s"}}},
        "accounts.fleet-a.clientId is required",
    ),
    (
        "no username",
        {"accounts": {"fleet-a": {"clientId": "c", "existingSecret": "s"}}},
        "accounts.fleet-a.username is required",
    ),
    (
        "misspelt account key",
        {"accounts": {"fleet-a": dict(_ACCOUNT, clientSecrets="x")}},
        "additional properties 'clientSecrets' not allowed",
    ),
    (
        "bad account name",
        {"accounts": {"fleet/a": _ACCOUNT}},
        "accounts.fleet/a: invalid account name",
    ),
    (
        "chart-owned config key",
        with_account(config={"listen": "0.0.0.0:1"}),
        "config.listen is set by the chart (from service.port)",
    ),
    (
        "chart-owned accounts in config",
        with_account(config={"accounts": {}}),
        "config.accounts is set by the chart",
    ),
    (
        "serviceMonitor without metrics",
        with_account(metrics={"enabled": False, "port": 9090}, serviceMonitor={"enabled": True, "interval": "30s"}),
        "serviceMonitor.enabled needs metrics.enabled",
    ),
    (
        "networkPolicy without clients",
        with_account(networkPolicy={"enabled": True, "allowedClients": []}),
        "networkPolicy.allowedClients: list at least one peer",
    ),
    (
        "termination grace not above drain grace",
        with_account(config={"shutdown_grace": "30s"}, terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds (30) must be more than the broker's drain grace",
    ),
    (
        "unreadable shutdown_grace",
        with_account(config={"shutdown_grace": "soon"}),
        'config.shutdown_grace: "soon" is not a duration',
    ),
    (
        "unknown top-level value",
        with_account(replicas=2),
        "additional properties 'replicas' not allowed",
    ),
    (
        "wrong type",
        with_account(replicaCount="two"),
        "/replicaCount",
    ),
]


@pytest.mark.parametrize(("values", "message"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_fail_rendering(chart, values, message):
    error = render_error(chart, values)
    assert message in error, error
