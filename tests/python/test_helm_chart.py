"""The Helm chart `helm/bace-token-broker`: lint, render, Kubernetes schemas, and the broker's
own verdict on the config the chart renders.

Helm runs in-process through `helm-python-sdk` (Helm v4's Go SDK behind a C ABI: no helm
binary, no cluster, no network). Every rendered object is validated against the Kubernetes
1.30 JSON schemas that `kubernetes-validate` ships in its wheel (strict: unknown fields are
errors); the ServiceMonitor is a CRD, so its fields are asserted by hand instead.

The cases are the chart defaults plus one account, and the values files under
`tests/helm/values/`. The broker binary (`BROKER_BIN`, default target/debug/bace-token-broker)
runs `check-config` on each rendered config, with the mounted files created in a temp dir at
the paths the config names: account secrets, real PEMs for TLS (a CA, a server certificate and
its key, made with `cryptography`), the cluster CA and a stand-in token for the JWKS fetch.
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
import testkit
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "bace-token-broker"
VALUES_DIR = REPO_ROOT / "tests" / "helm" / "values"
KUBE_VERSION = "1.30.0"
RELEASE = "tb"
NAMESPACE = "bace"
FULLNAME = "tb-bace-token-broker"
SECRETS_DIR = "/var/run/secrets/bace"
TLS_DIR = "/var/run/secrets/bace-tls"
KUBE_API_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STORE_DIR = "/var/run/secrets/bace-store"
STORE_CA_DIR = "/var/run/secrets/bace-store-ca"
# A line of the store's key file (`bace-token-broker gen-store-key` prints such lines).
STORE_KEY_LINE = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
ISSUER_DISCOVERY_BINDING = f"{NAMESPACE}-{FULLNAME}-issuer-discovery"
# Objects without a namespace.
CLUSTER_SCOPED = {"ClusterRoleBinding"}
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
    "tls-mtls",
    "auth-kubernetes",
    "store-redis",
    "store-rediss",
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


def tls_on(values: dict[str, Any]) -> bool:
    return bool(values.get("tls", {}).get("existingSecret"))


def kubernetes_auth_on(values: dict[str, Any]) -> bool:
    return bool(values.get("auth", {}).get("kubernetes", {}).get("enabled"))


def probe_port(values: dict[str, Any]) -> int:
    """Where the probes and the helm test check health: the plaintext health port with TLS on."""
    service = values.get("service", {})
    return service.get("healthPort", 50052) if tls_on(values) else service.get("port", 50051)


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
    for key in ("image", "service", "metrics", "serviceMonitor", "networkPolicy", "tls", "auth", "topologySpread"):
        sub = schema["properties"][key]["properties"]
        assert set(defaults[key]) <= set(sub), (key, set(defaults[key]) - set(sub))
    store = schema["properties"]["store"]["properties"]["redis"]["properties"]
    assert set(defaults["store"]["redis"]) == set(store), set(defaults["store"]["redis"]) ^ set(store)
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
        if kind in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"]
        else:
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
    if kubernetes_auth_on(values):
        expected.append("ClusterRoleBinding")
    assert r.kinds() == sorted(expected)
    assert "helm test" in r.notes and "port-forward" in r.notes


def test_probes(case):
    """Probes check gRPC health on the gRPC port, or with TLS on (probes do not speak TLS) on
    the plaintext health port, the broker's health_listen."""
    _, values, r = case
    port = probe_port(values)
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


def test_tls_and_kube_api_volumes_only_when_on(case):
    """The TLS Secret is mounted only with TLS on, the projected token only with
    auth.kubernetes; the pod never automounts its API token."""
    _, values, r = case
    mounts = {m["name"]: m for m in r.broker["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert ("tls" in mounts, "tls" in volumes) == (tls_on(values),) * 2
    on = kubernetes_auth_on(values)
    assert ("kube-api-access" in mounts, "kube-api-access" in volumes) == (on, on)
    assert r.pod_spec["automountServiceAccountToken"] is False
    config = r.config
    assert ("tls" in config) == tls_on(values)
    assert ("auth" in config) == bool(on or values.get("auth", {}).get("allow"))


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
    expected = {"grpc"}
    if metrics_on:
        port = metrics.get("port", 9090)
        expected.add("metrics")
        assert ports["metrics"]["port"] == port and ports["metrics"]["targetPort"] == "metrics"
        assert container_ports["metrics"] == port
        assert config["metrics_listen"] == f"0.0.0.0:{port}"
    else:
        assert config["metrics_listen"] == "", "empty turns the broker's metrics listener off"
    if tls_on(values):
        # The plaintext health-only listener (health_listen), for the probes and helm test.
        port = values.get("service", {}).get("healthPort", 50052)
        expected.add("health")
        assert ports["health"]["port"] == port and ports["health"]["targetPort"] == "health"
        assert ports["health"]["appProtocol"] == "grpc"
        assert container_ports["health"] == port
        assert config["health_listen"] == f"0.0.0.0:{port}"
    else:
        assert "health_listen" not in config  # the broker serves it only with TLS on
    assert set(ports) == expected and set(container_ports) == expected
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
    assert not any(a.startswith("-tls") for a in c["args"]), "the probe port is plaintext"
    assert f"-addr={FULLNAME}:{probe_port(values)}" in c["args"]
    assert f"-service={READINESS_SERVICE}" in c["args"]


@pytest.fixture(scope="module")
def pki():
    """A CA and a server certificate from it, standing in for the TLS Secret."""
    ca = testkit.CertificateAuthority()
    server = ca.issue(FULLNAME, dns=[FULLNAME, f"{FULLNAME}.{NAMESPACE}.svc"], server=True)
    return ca, server


def check_config(values: dict[str, Any], r: Rendered, tmp_path: Path, pki) -> tuple[str, str]:
    """Runs `bace-token-broker check-config` on the rendered config once the mounted files exist
    (here under a temp dir standing in for /var/run/secrets): account secrets, the TLS Secret's
    certificate, key and CA (real PEMs: the broker parses them and checks that the key matches
    the certificate), and the cluster CA and token the JWKS is fetched with. Returns the
    config text as checked and the broker's stdout; fails the test if it refuses the config."""
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    root = tmp_path / "secrets"
    text = r.config_text
    assert SECRETS_DIR in text
    mounted = {
        SECRETS_DIR: root / "bace",
        TLS_DIR: root / "bace-tls",
        KUBE_API_DIR: root / "sa",
        STORE_DIR: root / "bace-store",
        STORE_CA_DIR: root / "bace-store-ca",
    }
    for directory, replacement in mounted.items():
        text = text.replace(directory + "/", f"{replacement}/")
    assert "/var/run/secrets/" not in text, text
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
    ca, server = pki
    if "tls" in config:
        tls = config["tls"]
        server.write(Path(tls["cert_file"]), Path(tls["key_file"]))
        if "client_ca_file" in tls:
            Path(tls["client_ca_file"]).write_bytes(ca.cert_pem)
    kubernetes = config.get("auth", {}).get("kubernetes")
    if kubernetes:
        ca_file, token_file = Path(kubernetes["ca_file"]), Path(kubernetes["bearer_token_file"])
        ca_file.parent.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(ca.cert_pem)  # kube-root-ca.crt's ca.crt
        token_file.write_text("projected-service-account-token")
    redis = config.get("store", {}).get("redis")
    if redis:
        keys = Path(redis["encryption_key_file"])
        keys.parent.mkdir(parents=True, exist_ok=True)
        keys.write_text(STORE_KEY_LINE + "\n")
        if "password_file" in redis:
            Path(redis["password_file"]).write_text("redis-password-from-secret\n")
        if "ca_file" in redis:
            Path(redis["ca_file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(redis["ca_file"]).write_bytes(ca.cert_pem)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    proc = subprocess.run(
        [str(binary), "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"check-config refused the rendered config:\n{proc.stderr}\n{text}"
    return text, proc.stdout


def test_broker_check_config_accepts_rendered_config(case, tmp_path, pki):
    """`bace-token-broker check-config` accepts every case's rendered config."""
    _, values, r = case
    _, stdout = check_config(values, r, tmp_path, pki)
    assert f"{len(values['accounts'])} account(s)" in stdout


def test_broker_check_config_refuses_a_key_of_another_certificate(chart, tmp_path, pki):
    """The check above is real: a TLS key that does not match the certificate is refused."""
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    values = CASES["tls-mtls"]
    text = render(chart, values).config_text.replace(TLS_DIR + "/", f"{tmp_path}/")
    config = yaml.safe_load(text)
    for acc in config["accounts"].values():
        for field in ("client_secret_file", "password_file"):
            path = tmp_path / Path(acc[field]).relative_to("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")
            text = text.replace(acc[field], str(path))
    ca, server = pki
    other = ca.issue("other", dns=["other"], server=True)
    Path(config["tls"]["cert_file"]).write_bytes(server.cert_pem)
    Path(config["tls"]["key_file"]).write_bytes(other.key_pem)
    Path(config["tls"]["client_ca_file"]).write_bytes(ca.cert_pem)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    proc = subprocess.run(
        [str(binary), "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout
    assert "tls.key_file" in proc.stderr, proc.stderr


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


def test_tls_mtls(chart):
    """tls.existingSecret + clientCA: the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt)
    mounted read-only where the broker's tls section points; the allow list rendered as is."""
    values = CASES["tls-mtls"]
    r = render(chart, values)
    config = r.config
    assert config["tls"] == {
        "cert_file": f"{TLS_DIR}/tls.crt",
        "key_file": f"{TLS_DIR}/tls.key",
        "client_ca_file": f"{TLS_DIR}/ca.crt",
    }
    assert config["health_listen"] == "0.0.0.0:50062"
    assert config["auth"] == {"allow": values["auth"]["allow"]}, "no kubernetes section"
    mounts = {m["name"]: m for m in r.broker["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    assert "subPath" not in mounts["tls"], "a subPath mount would never see a renewed Secret"
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    secret = volumes["tls"]["secret"]
    assert secret["secretName"] == "bace-broker-tls"
    assert secret["defaultMode"] == 0o440
    assert {i["key"]: i["path"] for i in secret["items"]} == {
        "tls.crt": "tls.crt",
        "tls.key": "tls.key",
        "ca.crt": "ca.crt",
    }
    for field in ("cert_file", "key_file", "client_ca_file"):
        directory, filename = os.path.split(config["tls"][field])
        assert directory == mounts["tls"]["mountPath"]
        assert filename in {i["path"] for i in secret["items"]}
    # Probes on the plaintext health port (checked for every case in test_probes).
    ports = {p["name"]: p["containerPort"] for p in r.broker["ports"]}
    assert r.broker["readinessProbe"]["grpc"]["port"] == ports["health"] == 50062
    assert "client certificate required" in r.notes
    assert "--cert-file" in r.notes and "https://" in r.notes


def test_tls_without_client_ca(chart):
    """Server TLS only: no client_ca_file, no ca.crt item (the Secret need not have one)."""
    values = with_account(tls={"existingSecret": "broker-tls", "clientCA": False})
    r = render(chart, values)
    assert r.config["tls"] == {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
    assert "auth" not in r.config
    secret = {v["name"]: v for v in r.pod_spec["volumes"]}["tls"]["secret"]
    assert [i["key"] for i in secret["items"]] == ["tls.crt", "tls.key"]
    assert r.broker["livenessProbe"]["grpc"]["port"] == 50052
    assert "No caller authentication" in r.notes


def test_auth_kubernetes(chart):
    """auth.kubernetes: the broker checks tokens against the in-cluster JWKS, which it fetches
    with the cluster CA and a projected token of its own service account (not automounted),
    bound to the issuer-discovery ClusterRole."""
    values = CASES["auth-kubernetes"]
    r = render(chart, values)
    config = r.config
    assert config["auth"] == {
        "kubernetes": {
            "issuer": "https://oidc.example.com/clusters/prod",
            "jwks_url": "https://kubernetes.default.svc/openid/v1/jwks",
            "audience": "bace-token-broker-prod",
            "ca_file": f"{KUBE_API_DIR}/ca.crt",
            "bearer_token_file": f"{KUBE_API_DIR}/token",
        },
        "allow": [
            {"caller": "system:serviceaccount:reports:exporter", "accounts": ["*"]},
            {"caller": "system:serviceaccount:ingest:worker", "accounts": ["fleet-a"]},
        ],
    }
    assert "tls" not in config and "health_listen" not in config
    mounts = {m["name"]: m for m in r.broker["volumeMounts"]}
    assert mounts["kube-api-access"] == {
        "name": "kube-api-access",
        "mountPath": KUBE_API_DIR,
        "readOnly": True,
    }
    projected = {v["name"]: v for v in r.pod_spec["volumes"]}["kube-api-access"]["projected"]
    token_source, ca_source = projected["sources"]
    # No audience: the API server's own, which /openid/v1/jwks accepts.
    assert token_source == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
    assert ca_source == {
        "configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    }
    assert r.pod_spec["automountServiceAccountToken"] is False
    crb = r.get("ClusterRoleBinding", ISSUER_DISCOVERY_BINDING)
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:service-account-issuer-discovery",
    }
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # Plaintext: probes on the gRPC port (test_probes).
    assert r.broker["readinessProbe"]["grpc"]["port"] == 50051
    # NOTES: how a client pod gets a token with the right audience, and sends it.
    notes = r.notes
    assert "serviceAccountToken:" in notes
    assert "audience: bace-token-broker-prod" in notes
    assert "expirationSeconds: 3600" in notes
    assert "authorization: Bearer $(cat " in notes
    assert "kubectl create token" in notes and "--audience bace-token-broker-prod" in notes


def test_auth_kubernetes_defaults(chart):
    values = with_account(
        auth={
            "kubernetes": {"enabled": True},
            "allow": [{"caller": "system:serviceaccount:a:b", "accounts": ["fleet-a"]}],
        }
    )
    k8s = render(chart, values).config["auth"]["kubernetes"]
    assert k8s["issuer"] == "https://kubernetes.default.svc.cluster.local"
    assert k8s["jwks_url"] == "https://kubernetes.default.svc/openid/v1/jwks"
    assert k8s["audience"] == "bace-token-broker"


def test_auth_off_by_default(chart):
    r = render(chart, ONE_ACCOUNT)
    assert "auth" not in r.config and "tls" not in r.config
    assert ("ClusterRoleBinding", ISSUER_DISCOVERY_BINDING) not in r.objects


def test_network_policy_with_tls_and_auth_kubernetes(chart):
    """TLS on: only the helm test pod may reach the plaintext health port (probes come from
    the node). auth.kubernetes: egress to 6443 too, where the API server behind
    kubernetes.default.svc often listens."""
    values = CASES["tls-mtls"]
    r = render(chart, values)
    np = r.get("NetworkPolicy")["spec"]
    grpc_rule, metrics_rule, health_rule = np["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert health_rule["ports"] == [{"port": "health", "protocol": "TCP"}]
    (peer,) = health_rule["from"]
    test_labels = r.get("Pod", f"{FULLNAME}-test-readiness")["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= test_labels.items()
    egress_ports = sorted((p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")]

    values = dict(CASES["auth-kubernetes"], networkPolicy=CASES["tls-mtls"]["networkPolicy"])
    np = render(chart, values).get("NetworkPolicy")["spec"]
    assert [rule["ports"][0]["port"] for rule in np["ingress"]] == ["grpc", "metrics"]
    egress_ports = sorted((p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (6443, "TCP")]


def test_tls_and_auth_kubernetes_together(chart, tmp_path, pki):
    """Both identity sources at once: both mounts, both config sections, and the broker
    accepts the config."""
    values = dict(
        CASES["auth-kubernetes"],
        tls={"existingSecret": "broker-tls", "clientCA": True},
    )
    r = render(chart, values)
    assert {"tls", "auth", "health_listen"} <= set(r.config)
    assert set(r.config["auth"]) == {"kubernetes", "allow"}
    names = {m["name"] for m in r.broker["volumeMounts"]}
    assert {"tls", "kube-api-access"} <= names
    assert "Client certificate" in r.notes and "Service-account token" in r.notes
    check_config(values, r, tmp_path, pki)


# === bad values fail with a clear message ===

_ACCOUNT = ONE_ACCOUNT["accounts"]["fleet-a"]
_NO_SECRET = {"clientId": "c", "username": "u"}

def store_redis(**overrides: Any) -> dict[str, Any]:
    """store.redis values: the chart defaults, on (a URL and a Secret), with `overrides`."""
    redis = {
        "url": "redis://redis-master:6379/0",
        "username": "",
        "existingSecret": "bace-broker-store",
        "passwordKey": "redis-password",
        "encryptionKeysKey": "encryption-keys",
        "caSecret": "",
        "keyPrefix": "bace-broker",
        "timeout": "500ms",
        "lease": "30s",
    }
    redis.update(overrides)
    return redis


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
        "chart-owned tls in config",
        with_account(config={"tls": {"cert_file": "/x", "key_file": "/y"}}),
        "config.tls is set by the chart (from tls.existingSecret/tls.clientCA)",
    ),
    (
        "chart-owned auth in config",
        with_account(config={"auth": {"allow": []}}),
        "config.auth is set by the chart (from auth.kubernetes/auth.allow)",
    ),
    (
        "chart-owned health_listen in config",
        with_account(config={"health_listen": "0.0.0.0:1"}),
        "config.health_listen is set by the chart (from service.healthPort)",
    ),
    (
        "clientCA without a TLS Secret",
        with_account(tls={"existingSecret": "", "clientCA": True}),
        "tls.clientCA needs tls.existingSecret",
    ),
    (
        "health port equal to the gRPC port",
        with_account(
            tls={"existingSecret": "t", "clientCA": False},
            service={"type": "ClusterIP", "port": 50051, "healthPort": 50051},
        ),
        "service.healthPort must differ from service.port",
    ),
    (
        "health port equal to the metrics port",
        with_account(
            tls={"existingSecret": "t", "clientCA": False},
            service={"type": "ClusterIP", "port": 50051, "healthPort": 9090},
        ),
        "service.healthPort must differ from metrics.port",
    ),
    (
        "auth.kubernetes without an allow list",
        with_account(auth={"kubernetes": {"enabled": True}, "allow": []}),
        "auth.allow: list at least one {caller, accounts}",
    ),
    (
        "allow list without a way to identify callers",
        with_account(auth={"allow": [{"caller": "spiffe://x/y", "accounts": ["*"]}]}),
        "auth.allow needs a way to identify callers",
    ),
    (
        "allow list with TLS but no client CA",
        with_account(
            tls={"existingSecret": "t", "clientCA": False},
            auth={"allow": [{"caller": "spiffe://x/y", "accounts": ["*"]}]},
        ),
        "auth.allow needs a way to identify callers",
    ),
    (
        "allow entry without accounts",
        with_account(
            auth={"kubernetes": {"enabled": True}, "allow": [{"caller": "system:serviceaccount:a:b", "accounts": []}]}
        ),
        "/auth/allow/0/accounts",
    ),
    (
        "misspelt allow key",
        with_account(
            auth={"kubernetes": {"enabled": True}, "allow": [{"caller": "c", "account": ["x"]}]}
        ),
        "additional properties 'account' not allowed",
    ),
    (
        "misspelt auth.kubernetes key",
        with_account(auth={"kubernetes": {"enabled": True, "audiences": "x"}}),
        "additional properties 'audiences' not allowed",
    ),
    (
        "chart-owned store in config",
        with_account(config={"store": {"redis": {"url": "redis://r:6379"}}}),
        "config.store is set by the chart (from store.redis)",
    ),
    (
        "store URL with a password",
        with_account(store={"redis": store_redis(url="redis://:hunter2@r:6379")}),
        "store.redis.url must not hold a user or password",
    ),
    (
        "store URL of another scheme",
        with_account(store={"redis": store_redis(url="http://r:6379")}),
        "/store/redis/url",
    ),
    (
        "store without its Secret",
        with_account(store={"redis": store_redis(existingSecret="")}),
        "store.redis.existingSecret is required with store.redis.url",
    ),
    (
        "store CA without TLS",
        with_account(store={"redis": store_redis(caSecret="redis-ca")}),
        "store.redis.caSecret needs a rediss:// URL",
    ),
    (
        "store settings without a URL",
        with_account(store={"redis": store_redis(url="", existingSecret="s")}),
        "store.redis.existingSecret, caSecret and username need store.redis.url",
    ),
    (
        "misspelt store key",
        with_account(store={"redis": dict(store_redis(), keyprefix="x")}),
        "additional properties 'keyprefix' not allowed",
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


# === the Redis store ===


def test_store_off_by_default(chart):
    """No store.redis.url: no store section, no store volume; a single replica's NOTES say
    nothing about independence."""
    r = render(chart, with_account())
    assert "store" not in r.config
    volumes = {v["name"] for v in r.pod_spec["volumes"]}
    assert not {"store", "store-ca"} & volumes
    assert "run independently" not in r.notes and "Redis" not in r.notes


def test_replicas_without_a_store_are_said_to_run_independently(chart):
    r = render(chart, with_account(replicaCount=3))
    assert "The 3 replicas run independently" in r.notes
    assert "store.redis.url" in r.notes


def test_store_redis(chart):
    """store.redis: rendered into the broker's store section, its Secret mounted read-only
    where the section points, and NOTES say the replicas are one broker."""
    values = CASES["store-redis"]
    r = render(chart, values)
    assert r.config["store"] == {
        "redis": {
            "url": "redis://redis-master.data.svc:6379/0",
            "key_prefix": "team-a-broker",
            "timeout": "750ms",
            "lease": "20s",
            "encryption_key_file": f"{STORE_DIR}/encryption-keys",
            "password_file": f"{STORE_DIR}/redis-password",
        }
    }
    mounts = {m["name"]: m for m in r.broker["volumeMounts"]}
    assert mounts["store"] == {"name": "store", "mountPath": STORE_DIR, "readOnly": True}
    assert "store-ca" not in mounts
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["store"]["secret"] == {
        "secretName": "bace-broker-store",
        "items": [
            {"key": "encryption-keys", "path": "encryption-keys"},
            {"key": "redis-password", "path": "redis-password"},
        ],
        "defaultMode": 0o440,
    }
    assert "share one token per account through Redis" in r.notes
    assert "run independently" not in r.notes
    assert "does not use the store" not in r.notes
    assert "reconcile" in r.notes  # what happens while Redis is down
    assert "maxmemory-policy noeviction" in r.notes
    assert r.deployment["spec"]["replicas"] == 3


def test_store_rediss_with_user_ca_and_custom_keys(chart):
    values = CASES["store-rediss"]
    r = render(chart, values)
    redis = r.config["store"]["redis"]
    assert redis["url"] == "rediss://redis.data.svc:6380"
    assert redis["username"] == "broker"
    assert redis["ca_file"] == f"{STORE_CA_DIR}/ca.crt"
    assert redis["password_file"] == f"{STORE_DIR}/redis-password"
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["store"]["secret"]["items"] == [
        {"key": "keys", "path": "encryption-keys"},
        {"key": "password", "path": "redis-password"},
    ]
    assert volumes["store-ca"]["secret"] == {
        "secretName": "redis-ca",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
        "defaultMode": 0o440,
    }
    mounts = {m["name"]: m for m in r.broker["volumeMounts"]}
    assert mounts["store-ca"] == {"name": "store-ca", "mountPath": STORE_CA_DIR, "readOnly": True}
    (spread,) = r.pod_spec["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"


def test_store_without_a_password(chart):
    r = render(chart, with_account(store={"redis": store_redis(passwordKey="")}))
    assert "password_file" not in r.config["store"]["redis"]
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["store"]["secret"]["items"] == [
        {"key": "encryption-keys", "path": "encryption-keys"}
    ]


@pytest.mark.parametrize("replicas", [1, 3])
def test_pods_spread_across_nodes_by_default(chart, replicas):
    r = render(chart, with_account(replicaCount=replicas))
    (spread,) = r.pod_spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["maxSkew"] == 1 and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    off = render(chart, with_account(topologySpread={"enabled": False}))
    assert "topologySpreadConstraints" not in off.pod_spec


def test_broker_check_config_refuses_a_malformed_store_key_file(chart, tmp_path, pki):
    """check-config reads the store's key file: a malformed one is refused, naming the field
    and the line, never the key."""
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    text = render(chart, CASES["store-redis"]).config_text
    text = text.replace(SECRETS_DIR + "/", f"{tmp_path}/bace/").replace(STORE_DIR + "/", f"{tmp_path}/store/")
    config = yaml.safe_load(text)
    for acc in config["accounts"].values():
        for field in ("client_secret_file", "password_file"):
            path = Path(acc[field])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")
    redis = config["store"]["redis"]
    Path(redis["encryption_key_file"]).parent.mkdir(parents=True, exist_ok=True)
    Path(redis["password_file"]).write_text("pw\n")
    Path(redis["encryption_key_file"]).write_text(STORE_KEY_LINE + "\nk2 c2VjcmV0LVNFQ1JFVA==\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    proc = subprocess.run(
        [str(binary), "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout
    assert "store.redis.encryption_key_file" in proc.stderr and "line 2" in proc.stderr, proc.stderr
    assert "c2VjcmV0" not in proc.stderr and "AAECAw" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("url", "port"),
    [("redis://redis-master:6379/0", 6379), ("rediss://r.data.svc:6380", 6380), ("redis://r", 6379)],
)
def test_network_policy_lets_the_broker_reach_redis(chart, url, port):
    values = dict(CASES["networkpolicy-on"], store={"redis": store_redis(url=url)})
    np = render(chart, values).get("NetworkPolicy")["spec"]
    egress_ports = sorted((p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"])
    assert egress_ports == sorted([(53, "TCP"), (53, "UDP"), (443, "TCP"), (port, "TCP")])
