"""The Helm chart, checked with the real tools and over the objects it renders.

- the official helm v4 binary (fetched once by helm/tools/fetch_helm.py, sha256-pinned):
  `helm lint --strict` and `helm template` for the default values and every example values file;
- `kubernetes-validate --strict` against the Kubernetes 1.30 and 1.32 schemas, warnings failing;
- the rendered objects themselves (PyYAML): GPUs, hardening, probes, secrets, NetworkPolicy, schema.

No cluster is involved (none can run here): `lookup` sees nothing, so generated Secrets are fresh
on every render, exactly as under `helm template` in a user's shell.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cdface"
EXAMPLES = ROOT / "helm" / "examples"
KUBE_VERSION = "1.32.0"
VALIDATE_VERSIONS = ("1.30.0", "1.32.0")
GPU = "nvidia.com/gpu"

# Every way the chart is meant to be installed, as `helm template` arguments.
CASES: dict[str, list[str]] = {
    "default": [],
    **{p.stem: ["-f", str(p)] for p in sorted(EXAMPLES.glob("*.yaml"))},
    # Everything at once: every retraining object, in-chart PostgreSQL, TensorRT, monitoring.
    "everything": ["-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"), "--set", "training.job.enabled=true",
                   "--set", "training.cronJob.enabled=true"],
    "external-db": ["--set", "database.mode=external", "--set", "database.external.existingSecret=cdface-db",
                    "--set", "gateway.replicaCount=3", "--set", "gateway.secrets.existingSecret=cdface-keys"],
}
EXAMPLE_CASES = ["default"] + sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
# CRDs have no schema in kubernetes-validate: their pod templates are validated as core/v1
# PodTemplates, their own fields against the allow-lists below.
CRD_KINDS = {"PyTorchJob", "ServiceMonitor"}


def _load_fetch_helm():
    spec = importlib.util.spec_from_file_location("cdface_fetch_helm", ROOT / "helm" / "tools" / "fetch_helm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> str:
    return str(_load_fetch_helm().fetch_helm())


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    found = str(exe) if exe.exists() else shutil.which("kubernetes-validate")
    if not found:
        pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate; it is in the dev extra)")
    return found


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


@functools.lru_cache(maxsize=None)
def _render(helm: str, args: tuple[str, ...]) -> tuple[str, tuple[dict, ...]]:
    done = run_helm(helm, "template", "faces", str(CHART), "--namespace", "cdface", "--kube-version", KUBE_VERSION,
                    *args)
    assert done.returncode == 0, done.stderr
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    return done.stdout, docs


def render(helm: str, *args: str) -> list[dict]:
    return list(_render(helm, tuple(args))[1])


def render_case(helm: str, case: str) -> list[dict]:
    return render(helm, *CASES[case])


# ---------- walking the rendered objects ----------

def pod_templates(docs: list[dict]):
    """(object, pod template) for every workload, PyTorchJob replicas included."""
    for d in docs:
        kind = d["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]
        elif kind == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "PyTorchJob":
            for spec in d["spec"]["pytorchReplicaSpecs"].values():
                yield d, spec["template"]


def containers(docs: list[dict]):
    """(object, pod template, container, is_init) for every container."""
    for obj, tpl in pod_templates(docs):
        for c in tpl["spec"].get("initContainers", []):
            yield obj, tpl, c, True
        for c in tpl["spec"]["containers"]:
            yield obj, tpl, c, False


def component(labels: dict) -> str:
    return labels.get("app.kubernetes.io/component", "")


def one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: found {[d['metadata']['name'] for d in found]}"
    return found[0]


def selector_matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


# ---------- the real tools ----------

@pytest.mark.parametrize("case", EXAMPLE_CASES)
def test_helm_lint_strict(helm, case):
    done = run_helm(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *CASES[case])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    # lint reports a template's `fail` only as an INFO line: treat it as the failure it is.
    assert "funcMap fail" not in done.stderr + done.stdout, done.stderr


def _validation_input(docs: list[dict]) -> list[dict]:
    """Core objects as rendered, plus each CRD pod template as a core/v1 PodTemplate."""
    out = [d for d in docs if d["kind"] not in CRD_KINDS]
    for obj, tpl in pod_templates([d for d in docs if d["kind"] in CRD_KINDS]):
        out.append({"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{obj['metadata']['name']}-{len(out)}"}, "template": tpl})
    return out


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_kubernetes_validate_strict(helm, kubernetes_validate, tmp_path, case, version):
    docs = _validation_input(render_case(helm, case))
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    done = subprocess.run([kubernetes_validate, "--strict", "-k", version, str(manifest)], capture_output=True,
                          text=True, timeout=120)
    out = done.stdout + done.stderr
    bad = [line for line in out.splitlines() if not line.startswith("INFO")]
    assert done.returncode == 0 and not bad, out
    assert out.count(" passed for resource ") == len(docs), out


SERVICE_MONITOR_SPEC = {"namespaceSelector", "selector", "endpoints"}
SERVICE_MONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout"}
PYTORCHJOB_SPEC = {"nprocPerNode", "runPolicy", "pytorchReplicaSpecs"}
PYTORCHJOB_RUN_POLICY = {"backoffLimit", "cleanPodPolicy"}
PYTORCHJOB_REPLICA = {"replicas", "restartPolicy", "template"}


def test_crd_objects_use_known_fields(helm):
    """Fields of the CRDs as the operators' v1 APIs define them (no schema ships for CRDs)."""
    docs = render_case(helm, "everything")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {component(m["metadata"]["labels"]) for m in monitors} == {"gateway", "triton"}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(m["spec"]) <= SERVICE_MONITOR_SPEC
        for ep in m["spec"]["endpoints"]:
            assert set(ep) <= SERVICE_MONITOR_ENDPOINT
            assert re.fullmatch(r"\d+[smh]", ep["interval"])
    job = one(docs, "PyTorchJob", "-train-1")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert set(job["spec"]) <= PYTORCHJOB_SPEC
    assert set(job["spec"]["runPolicy"]) <= PYTORCHJOB_RUN_POLICY
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 1  # nodes: 2
    for spec in replicas.values():
        assert set(spec) <= PYTORCHJOB_REPLICA
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch"  # the operator requires it


def test_service_monitors_point_at_real_ports(helm):
    docs = render_case(helm, "everything")
    services = [d for d in docs if d["kind"] == "Service"]
    for m in (d for d in docs if d["kind"] == "ServiceMonitor"):
        selected = [s for s in services if selector_matches(m["spec"]["selector"], s["metadata"]["labels"])]
        assert selected
        for ep in m["spec"]["endpoints"]:
            assert any(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)


# ---------- GPUs ----------

def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


@pytest.mark.parametrize("case", list(CASES))
def test_gpus_only_on_triton_and_training(helm, case):
    docs = render_case(helm, case)
    for obj, tpl, c, _ in containers(docs):
        if gpu_limit(c):
            comp = component(tpl["metadata"]["labels"])
            assert (comp == "triton" and c["name"] in ("triton", "build-engines")) or \
                   (comp in ("training", "reembed") and c["name"] in ("train", "pytorch")), \
                f"{obj['kind']}/{obj['metadata']['name']} container {c['name']} asks for a GPU"
        # GPUs are whole devices: never a request without the same limit, never fractions.
        assert GPU not in c.get("resources", {}).get("requests", {})


def test_gpu_counts(helm):
    docs = render_case(helm, "everything")
    triton = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]
    assert gpu_limit(triton["containers"][0]) == 1
    assert gpu_limit(triton["initContainers"][0]) == 1  # the engine is built on the GPU it will run on
    for obj, tpl, c, _ in containers(docs):
        if c["name"] in ("train", "pytorch"):
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert gpu_limit(c) == 8 and env["GPUS"] == "8", obj["metadata"]["name"]
        elif component(tpl["metadata"]["labels"]) != "triton":
            assert gpu_limit(c) == 0, (obj["metadata"]["name"], c["name"])
    cpu = render_case(helm, "cpu-trial")
    assert not [c["name"] for _, _, c, _ in containers(cpu) if gpu_limit(c)]
    assert "--allow-gpu-metrics=false" in one(cpu, "Deployment", "-triton")["spec"]["template"]["spec"][
        "containers"][0]["args"]


def test_torchrun_uses_one_process_per_gpu(helm):
    docs = render_case(helm, "everything")
    script = one(docs, "ConfigMap", "-training-scripts")["data"]["train.sh"]
    assert 'torchrun --nproc-per-node "$GPUS" -m cdface.cli train' in script
    assert "run.stage=pretrain" in script and "run.init_from=$OUT/pretrain/checkpoints/last.pt" in script
    assert one(docs, "PyTorchJob", "-train-1")["spec"]["nprocPerNode"] == "8"
    assert one(docs, "CronJob", "-retrain")["spec"]["concurrencyPolicy"] == "Forbid"


# ---------- hardening ----------

@pytest.mark.parametrize("case", list(CASES))
def test_every_container_is_bounded_and_restricted(helm, case):
    docs = render_case(helm, case)
    seen = 0
    for obj, tpl, c, is_init in containers(docs):
        where = f"{obj['kind']}/{obj['metadata']['name']}:{c['name']}"
        res = c.get("resources", {})
        assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"), where
        assert res.get("limits", {}).get("memory"), where
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("privileged") in (None, False), where
        assert "ALL" in sc.get("capabilities", {}).get("drop", []) and not sc["capabilities"].get("add"), where
        pod = tpl["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        long_running = obj["kind"] in ("Deployment", "StatefulSet") and not is_init
        if long_running:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in c, f"{where} has no {probe}"
        # A read-only root needs somewhere writable to put temporary files.
        assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])) or \
            obj["kind"] == "StatefulSet", where
        image = c["image"]
        assert not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image), where
        seen += 1
    assert seen >= 2


def test_probe_endpoints(helm):
    docs = render_case(helm, "default")
    gw = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["args"] == ["serve"]
    tr = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]
    assert tr["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert tr["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["containerPort"] for p in tr["ports"]} == {8000, 8001, 8002}
    assert "--model-control-mode=explicit" in tr["args"] and "--load-model=face" in tr["args"]
    assert tr["image"] == "nvcr.io/nvidia/tritonserver:24.08-py3"
    poll = one(render(helm, "--set", "triton.modelControlMode=poll"), "Deployment", "-triton")
    args = poll["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--model-control-mode=poll" in args and "--repository-poll-secs=30" in args


def test_sqlite_gateway_is_single_writer(helm):
    docs = render_case(helm, "default")
    gw = one(docs, "Deployment", "-gateway")
    assert gw["spec"]["replicas"] == 1 and gw["spec"]["strategy"]["type"] == "Recreate"
    done = run_helm(helm, "template", "x", str(CHART), "--set", "gateway.replicaCount=2")
    assert done.returncode != 0 and "database.mode=sqlite" in done.stderr
    pg = one(render_case(helm, "multi-gpu-postgresql"), "Deployment", "-gateway")
    assert "replicas" not in pg["spec"]  # the HPA owns the count
    assert pg["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ---------- secrets ----------

SECRET_NAME = re.compile(r"PASSWORD|PEPPER|SECRET|TOKEN|_KEY$|API_KEY", re.I)


def secret_values(docs: list[dict]) -> set[str]:
    values = set()
    for d in docs:
        if d["kind"] == "Secret":
            for v in (d.get("data") or {}).values():
                values.add(base64.b64decode(v).decode())
            values.update((d.get("stringData") or {}).values())
    return {v for v in values if len(v) >= 8}


def literals(docs: list[dict]):
    """Every string a pod or a ConfigMap shows in the clear: env values, commands, args, data."""
    for d in docs:
        if d["kind"] == "ConfigMap":
            for k, v in (d.get("data") or {}).items():
                yield f"ConfigMap/{d['metadata']['name']}:{k}", v
    for obj, _, c, _ in containers(docs):
        where = f"{obj['metadata']['name']}:{c['name']}"
        for e in c.get("env", []):
            if "value" in e:
                yield f"{where} env {e['name']}", str(e["value"])
        for part in c.get("command", []) + c.get("args", []):
            yield f"{where} argv", part


@pytest.mark.parametrize("case", list(CASES) + ["url-in-values"])
def test_no_secret_in_configmaps_or_env_literals(helm, case):
    if case == "url-in-values":
        docs = render(helm, "--set", "database.mode=external", "--set",
                      "database.external.url=postgresql://cdface:Sup3rSecretPw@db.internal:5432/cdface")
        assert "Sup3rSecretPw" in "".join(secret_values(docs))
    else:
        docs = render_case(helm, case)
    secrets = secret_values(docs)
    for where, text in literals(docs):
        for value in secrets:
            assert value not in text, f"a Secret's value appears in {where}"
    for obj, _, c, _ in containers(docs):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "valueFrom" in e and "secretKeyRef" in e["valueFrom"], f"{c['name']} {e['name']}"
            if e["name"] == "CDFACE_SERVE_DATABASE_URL" and "value" in e:
                # only the in-chart PostgreSQL's URL, with the password substituted by Kubernetes
                assert "$(PGPASSWORD)@" in e["value"] and not re.search(r":[^:@/$]+@", e["value"])
    for d in docs:
        if d["kind"] == "ConfigMap":
            assert not re.search(r"postgres(ql)?://[^@\s]+:[^@\s$]+@", json.dumps(d["data"]))


def test_generated_secrets(helm):
    first = one(render_case(helm, "multi-gpu-postgresql"), "Secret", "-gateway")
    data = {k: base64.b64decode(v).decode() for k, v in first["data"].items()}
    assert re.fullmatch(r"cdf_[0-9a-f]{12}_[A-Za-z0-9]{40}", data["admin-api-key"])  # the gateway's key format
    assert re.fullmatch(r"[A-Za-z0-9]{48}", data["key-pepper"])
    assert first["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pg = one(render_case(helm, "multi-gpu-postgresql"), "Secret", "-postgresql")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", base64.b64decode(pg["data"]["password"]).decode())
    # Without a cluster `lookup` finds nothing, so each `helm template` generates anew (documented);
    # on a cluster the values already in the release's Secrets are reused.
    again = run_helm(helm, "template", "faces", str(CHART), "--show-only", "templates/secrets.yaml")
    assert yaml.safe_load(again.stdout)["data"]["key-pepper"] != first["data"]["key-pepper"]
    lookup = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret"' in lookup


def test_existing_secrets_generate_nothing(helm):
    docs = render_case(helm, "external-db")
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = {e["name"]: e for e in one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CDFACE_SERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "cdface-db", "key": "database-url"}
    assert env["CDFACE_SERVE_KEY_PEPPER"]["valueFrom"]["secretKeyRef"]["name"] == "cdface-keys"


# ---------- NetworkPolicy ----------

def allowed(policy: dict, pod_labels: dict, port: int) -> bool:
    """Whether a pod of the same namespace with `pod_labels` may open `port` under `policy`."""
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            if "podSelector" in peer and "namespaceSelector" not in peer and \
                    selector_matches(peer["podSelector"], pod_labels):
                return True
    return False


def test_network_policy_selects_the_right_pods(helm):
    docs = render_case(helm, "everything")
    policies = {component(p["metadata"]["labels"]): p for p in docs if p["kind"] == "NetworkPolicy"}
    assert set(policies) == {"triton", "postgresql"}
    pods = [(component(tpl["metadata"]["labels"]), tpl["metadata"]["labels"]) for _, tpl in pod_templates(docs)]
    assert {c for c, _ in pods} >= {"gateway", "triton", "postgresql", "reembed", "training"}
    for target, ports in (("triton", (8000, 8001)), ("postgresql", (5432,))):
        policy = policies[target]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        # The policy governs exactly the target's pods.
        governed = {c for c, labels in pods if selector_matches(policy["spec"]["podSelector"], labels)}
        assert governed == {target}
        for comp, labels in pods:
            for port in ports:
                assert allowed(policy, labels, port) == (comp in ("gateway", "reembed")), (target, comp, port)
        # No rule opens these ports to other namespaces or to everyone.
        for rule in policy["spec"]["ingress"]:
            if {p["port"] for p in rule["ports"]} & set(ports):
                assert rule.get("from") and all(set(peer) == {"podSelector"} for peer in rule["from"])
    metrics = [r for r in policies["triton"]["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {8002}]
    assert metrics and metrics[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}


def test_network_policy_off(helm):
    assert not [d for d in render(helm, "--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]


# ---------- schema and refused values ----------

@pytest.mark.parametrize("args, message", [
    (["--set", "gateway.replicaCount=two"], "/gateway/replicaCount"),
    (["--set-string", "gateway.replicaCount=2"], "/gateway/replicaCount"),
    (["--set", "gateway.image.tag=null"], "tag"),
    (["--set", "gateway.image.tag="], "/gateway/image/tag"),
    (["--set", "triton.image.tag=null"], "tag"),
    (["--set", "training.image.tag="], "/training/image/tag"),
    (["--set", "gateway.replicas=2"], "replicas"),
    (["--set", "triton.gpus=-1"], "/triton/gpus"),
    (["--set", "triton.modelControlMode=none"], "/triton/modelControlMode"),
    (["--set", "database.mode=mysql"], "/database/mode"),
    (["--set", "gateway.securityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["--set", "gateway.securityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
    (["--set", "gateway.settings.key_pepper=abc"], "key_pepper"),
    (["--set", "training.publish.versionPolicy=newest"], "/training/publish/versionPolicy"),
])
def test_schema_refuses_wrong_values(helm, args, message):
    done = run_helm(helm, "template", "x", str(CHART), *args)
    assert done.returncode != 0, f"accepted {args}"
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "training.job.enabled=true"], "training.dataset.existingClaim"),
    (["--set", "database.mode=external"], "database.external.existingSecret"),
    (["--set", "triton.tensorrt.enabled=true", "--set", "triton.gpus=0"], "needs a GPU"),
    (["--set", "triton.modelRepository.source=url", "--set", "triton.modelRepository.url=s3://b/m"],
     "gateway.manifestConfigMap"),
    (["--set", "gateway.pdb.minAvailable=1", "--set", "gateway.pdb.maxUnavailable=1"], "not both"),
])
def test_inconsistent_values_fail_with_a_reason(helm, args, message):
    done = run_helm(helm, "template", "x", str(CHART), *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def _schema_node(schema: dict, node: dict) -> dict:
    while "$ref" in node or ("allOf" in node and len(node) <= 2):
        ref = node["$ref"] if "$ref" in node else node["allOf"][0]["$ref"]
        node = schema["definitions"][ref.rsplit("/", 1)[-1]]
    return node


def test_schema_describes_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []

    def walk(value, node, path):
        node = _schema_node(schema, node)
        if not any(k in node for k in ("type", "enum", "const", "oneOf")):
            missing.append(path)
            return
        if isinstance(value, dict) and "properties" in node:
            for k, v in value.items():
                if k not in node["properties"]:
                    missing.append(f"{path}.{k}")
                else:
                    walk(v, node["properties"][k], f"{path}.{k}")

    walk(values, schema, "")
    assert not missing, missing
    # Every object the chart defines refuses unknown keys (a typo is an error, not a silent default).
    def strict(node, path):
        if "ecurityContext" in path:  # Kubernetes' own securityContext: extra fields are Kubernetes'
            return
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
            for k, v in node["properties"].items():
                strict(_schema_node(schema, v), f"{path}.{k}")
    strict(schema, "")


# ---------- what the pods run ----------

def test_scripts_parse(helm):
    docs = render_case(helm, "everything")
    scripts = {**one(docs, "ConfigMap", "-training-scripts")["data"], **one(docs, "ConfigMap", "-triton-scripts")["data"]}
    assert set(scripts) == {"train.sh", "publish.sh", "reembed.py", "build-engines.sh"}
    for name, text in scripts.items():
        if name.endswith(".sh"):
            done = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True)
            assert done.returncode == 0, (name, done.stderr)
        else:
            compile(text, name, "exec")
    assert "cdface export tensorrt" in scripts["build-engines.sh"] and "--precision fp16" in scripts["build-engines.sh"]
    assert "cdface export onnx" in scripts["publish.sh"] and "cdface export triton /models" in scripts["publish.sh"]
    assert '"gallery", "reembed"' in scripts["reembed.py"]


def test_retraining_renders_only_when_asked(helm):
    default = render_case(helm, "default")
    assert not [d for d in default if d["kind"] in ("Job", "CronJob", "PyTorchJob")]
    one_node = render_case(helm, "one-gpu-node")
    assert [d["kind"] for d in one_node if d["kind"] in ("Job", "CronJob", "PyTorchJob")] == ["CronJob"]
    job = one(render_case(helm, "everything"), "Job", "-run-1")["spec"]["template"]["spec"]
    assert [c["name"] for c in job["initContainers"]] == ["train", "publish"]
    assert [c["name"] for c in job["containers"]] == ["reembed"]
    reembed = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert reembed["REEMBED"] == "1"  # PostgreSQL: the job re-embeds; with SQLite the gateway pod does
