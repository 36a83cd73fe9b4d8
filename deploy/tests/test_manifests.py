"""Offline checks of deploy/: Kubernetes manifests against the Kubernetes API schemas
(kubernetes-validate, strict), the Prometheus Operator resources against the strict subset
schemas in deploy/kubernetes/schemas, and consistency with the server itself: every KVCOMPACT_*
variable is a real flag, probes hit the health port, grace periods cover the drain, the alerting
rules and the dashboard use only exported series."""
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
KUBERNETES_VERSION = "1.31.0"
SERVER = os.environ.get("KVCOMPACT_SERVER_BINARY", os.path.join(ROOT, "build", "server", "kvcompact-server"))
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor.schema.json", "PrometheusRule": "prometheusrule.schema.json"}


def documents():
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            for doc in yaml.safe_load_all(open(os.path.join(K8S, name))):
                if doc:
                    yield name, doc


def pod_specs():
    for name, doc in documents():
        if doc["kind"] == "Deployment":
            yield name, doc["spec"]["template"]["spec"]


def kvcompact_containers():
    for name, spec in pod_specs():
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            if c["image"].startswith("kvcompact"):
                yield name, spec, c


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def server_flags():
    out = subprocess.run([SERVER, "--helpfull"], capture_output=True, text=True).stdout
    flags = set(re.findall(r"^\s+--([a-z0-9_]+)", out, re.M))
    assert "listen" in flags and "auth_token_file" in flags, out[:500]
    return flags


def test_kubernetes_resources_validate_strictly():
    kinds = set()
    for name, doc in documents():
        kinds.add(doc["kind"])
        if doc["kind"] in CRD_SCHEMAS:
            schema = json.load(open(os.path.join(K8S, "schemas", CRD_SCHEMAS[doc["kind"]])))
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
            "PrometheusRule"} <= kinds


def test_validators_reject_a_broken_manifest():
    _, deployment = next((n, d) for n, d in documents() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecs"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    monitor = next(d for _, d in documents() if d["kind"] == "ServiceMonitor")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.load(open(os.path.join(K8S, "schemas", "servicemonitor.schema.json"))))


def test_kustomization_lists_every_standalone_manifest():
    listed = set(yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))["resources"])
    present = {n for n in os.listdir(K8S) if n.endswith(".yaml") and n not in ("kustomization.yaml", "sidecar-example.yaml")}
    assert listed == present


def test_every_environment_variable_is_a_server_flag(server_flags):
    names = set()
    for _, _, c in kvcompact_containers():
        names |= {n for n in env_of(c) if n.startswith("KVCOMPACT_")}
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    names |= set(re.findall(r"\b(KVCOMPACT_[A-Z0-9_]+)=", dockerfile))
    assert names
    unknown = {n for n in names if n[len("KVCOMPACT_"):].lower() not in server_flags}
    assert not unknown, f"not server flags: {sorted(unknown)}"


def test_probes_use_grpc_on_the_health_port_and_grace_covers_the_drain():
    seen = 0
    for name, spec, c in kvcompact_containers():
        env = env_of(c)
        health_port = int(env["KVCOMPACT_HEALTH_LISTEN"].rsplit(":", 1)[1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == health_port, (name, probe)
        assert c["readinessProbe"]["grpc"]["service"] == "kvcompact.v1.KVCompact"
        drain = float(env.get("KVCOMPACT_DRAIN_DELAY_SECONDS", 0))
        shutdown = float(env.get("KVCOMPACT_SHUTDOWN_TIMEOUT_SECONDS", 10))
        assert spec["terminationGracePeriodSeconds"] > drain + shutdown + 5, name
        seen += 1
    assert seen == 2  # the standalone Deployment and the sidecar


def test_containers_run_unprivileged_with_resources():
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"]
            requests = c["resources"]["requests"]
            assert {"cpu", "memory", "nvidia.com/gpu"} <= set(requests), (name, c["name"])
            assert c["resources"]["limits"]["nvidia.com/gpu"] == requests["nvidia.com/gpu"]


def test_service_is_headless_and_targets_the_deployment():
    service = next(d for _, d in documents() if d["kind"] == "Service")
    deployment = next(d for n, d in documents() if d["kind"] == "Deployment" and n == "deployment.yaml")
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_prometheusrule_carries_the_rule_file():
    rule_file = yaml.safe_load(open(os.path.join(ROOT, "deploy", "prometheus", "rules.yaml")))
    resource = next(d for _, d in documents() if d["kind"] == "PrometheusRule")
    assert resource["spec"]["groups"] == rule_file["groups"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with the prometheus package")
def test_promtool_accepts_the_rules():
    out = subprocess.run(["promtool", "check", "rules", os.path.join(ROOT, "deploy", "prometheus", "rules.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def exported_families():
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    return set(re.findall(r"\n\| `((?:kvcompact|process)_[a-z_]+)`", text))


def families_in(expr):
    names = set(re.findall(r"\b((?:kvcompact|process)_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("kvcompact_") else n for n in names}


def test_dashboard_and_rules_use_only_exported_series():
    exported = exported_families()
    assert len(exported) > 20
    dashboard = json.load(open(os.path.join(ROOT, "deploy", "grafana", "kvcompact.json")))
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used |= families_in(t["expr"])
    for group in yaml.safe_load(open(os.path.join(ROOT, "deploy", "prometheus", "rules.yaml")))["groups"]:
        for rule in group["rules"]:
            used |= families_in(rule["expr"])
    assert used - exported == set()
    assert len(used) >= 20  # the dashboard covers most of the metric set


def unit_class(expr):
    """What a panel query measures, from its metric families: a ratio, bytes, seconds, a per-second
    rate, CPU cores, or a count."""
    if "tokens_in_total" in expr and "tokens_out_total" in expr and "/" in expr:
        return "ratio"
    if "cpu_seconds_total" in expr:
        return "cores"
    fam = min(families_in(expr) or {"up"})
    if "histogram_quantile" in expr:
        return "bytes" if fam.endswith("_bytes") else "seconds" if fam.endswith("_seconds") else fam
    if "rate(" in expr:
        return "per second"
    return "bytes" if fam.endswith("_bytes") else "count"


def test_dashboard_panels_give_each_unit_its_own_axis():
    """A panel that plots two kinds of quantity sets the unit (and a second axis) of the others
    by an override, so no axis mixes units."""
    dashboard = json.load(open(os.path.join(ROOT, "deploy", "grafana", "kvcompact.json")))
    for panel in dashboard["panels"]:
        by_ref = {t["refId"]: unit_class(t["expr"]) for t in panel["targets"]}
        overridden = {o["matcher"]["options"] for o in panel["fieldConfig"].get("overrides", [])
                      if o["matcher"]["id"] == "byFrameRefID" and any(p["id"] == "unit" for p in o["properties"])}
        left = {c for r, c in by_ref.items() if r not in overridden}
        assert len(left) <= 1, f"{panel['title']}: one axis mixes {sorted(left)}"


if __name__ == "__main__" and sys.argv[1:] == ["--write-prometheusrule"]:
    groups = yaml.safe_load(open(os.path.join(ROOT, "deploy", "prometheus", "rules.yaml")))["groups"]
    path = os.path.join(K8S, "prometheusrule.yaml")
    header = "".join(l for l in open(path) if l.startswith("#"))
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "kvcompact", "labels": {"app.kubernetes.io/name": "kvcompact"}}, "spec": {"groups": groups}}
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(doc, f, sort_keys=False, width=110)


def test_dockerfile_shares_the_ci_install_script_and_runs_unprivileged():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    ci = open(os.path.join(ROOT, "scripts", "test.sh")).read()
    assert "scripts/install-deps.sh" in ci
    assert re.search(r"^RUN /src/scripts/install-deps.sh", text, re.M), "the build stage installs like CI"
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage"
    assert re.search(r"^USER 10001", text, re.M)
    env = dict(re.findall(r"(KVCOMPACT_[A-Z_]+)=(\S+)", text))
    health_port = env["KVCOMPACT_HEALTH_LISTEN"].rsplit(":", 1)[1]
    assert f"--server=127.0.0.1:{health_port}" in text, "HEALTHCHECK asks the plaintext health port"
    assert f"/out/profiles/ {env['KVCOMPACT_PROFILES_DIR']}/" in text, "the profiles directory is in the image"
    runtime = text[text.rindex("\nFROM "):]
    assert "scripts/runtime-packages.sh" in text and re.search(r"apt-get install", runtime), \
        "the runtime stage installs the libraries' packages"
    assert "ldd" not in text and "/opt/kvcompact/lib" not in text, "no library files copied by hand"
    deployment = next(d for n, d in documents() if n == "deployment.yaml")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith("-cuda") and "kvcompact:0.1.0-cuda" in text, "the manifest names the CUDA variant the Dockerfile documents"


def test_runtime_packages_name_the_servers_libraries():
    binary = os.path.join(ROOT, "build", "server", "kvcompact-server")
    if not os.path.exists(binary) or shutil.which("dpkg") is None:
        pytest.skip("needs the built server and dpkg")
    out = subprocess.run([os.path.join(ROOT, "scripts", "runtime-packages.sh"), binary], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    packages = out.stdout.split()
    assert any(p.startswith("libgrpc++") for p in packages) and any(p.startswith("libprotobuf") for p in packages), packages
    assert not any(p.startswith("libc6") for p in packages), "libc comes with every base image"


def test_the_hpa_metric_has_an_adapter_rule():
    """The HPA's pods metric only exists through prometheus-adapter: the shipped rule serves it
    under that name from an exported series, per namespace and pod."""
    hpa = next(d for n, d in documents() if n == "hpa.yaml")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = yaml.safe_load(open(os.path.join(ROOT, "deploy", "prometheus", "adapter-rules.yaml")))["rules"]
    served = {r["name"]["as"]: r for r in rules}
    assert names and names <= set(served), (names, set(served))
    for name in names:
        rule = served[name]
        assert families_in(rule["seriesQuery"]) <= exported_families()
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
