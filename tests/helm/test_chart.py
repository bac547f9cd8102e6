"""The Helm chart, checked with the real tools and over the objects it renders.

- the official helm v4 binary (fetched once by helm/tools/fetch_helm.py, sha256-pinned):
  `helm lint --strict` and `helm template` for the default values and every example values file,
  on every supported Kubernetes version;
- `kubernetes-validate --strict` against the Kubernetes 1.32 to 1.36 schemas, warnings failing;
- every `helm` command with `--set` that docs/deploy.md or an example's comments document, parsed
  from those files (a newly documented command is tested without touching this file);
- the rendered objects themselves (PyYAML): GPUs, hardening, probes, secrets, NetworkPolicy, schema,
  scheduling, the Ingress, Triton's Services and autoscaling.

No cluster is involved (none can run here): `lookup` sees nothing, so generated Secrets are fresh
on every render, exactly as under `helm template` in a user's shell.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cdface"
EXAMPLES = ROOT / "helm" / "examples"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# Kubernetes versions the chart supports (Chart.yaml kubeVersion: >=1.32): lint and validate on each.
SUPPORTED_VERSIONS = ("1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0")
VALIDATE_VERSIONS = SUPPORTED_VERSIONS
KUBE_VERSION = SUPPORTED_VERSIONS[-1]  # what `helm template` renders for the object checks
GPU = "nvidia.com/gpu"

# Every way the chart is meant to be installed, as `helm template` arguments.
CASES: dict[str, list[str]] = {
    "default": [],
    **{p.stem: ["-f", str(p)] for p in sorted(EXAMPLES.glob("*.yaml"))},
    # Everything at once: every retraining object, in-chart PostgreSQL, TensorRT, monitoring.
    "everything": ["-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"), "--set", "training.job.enabled=true",
                   "--set", "training.cronJob.enabled=true"],
    "external-db": ["--set", "database.mode=external", "--set", "database.external.existingSecret=cdface-db",
                    "--set", "gateway.replicaCount=3", "--set", "gateway.secrets.existingSecret=cdface-keys",
                    "--set", "triton.modelControl.existingSecret=cdface-triton-control"],
    # The operator's `cdface model` Job and the scheduled Triton sync beside everything else.
    "model-commands": ["-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"), "--set", "training.cronJob.enabled=true",
                       "--set", "model.command.enabled=true", "--set", "model.command.args={rollback}",
                       "--set", "model.syncTriton.enabled=true"],
    # The in-chart PostgreSQL with its nightly pg_dump CronJob.
    "postgresql-backup": ["-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"),
                          "--set", "database.postgresql.backup.enabled=true"],
}
EXAMPLE_CASES = ["default"] + sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
# CRDs have no schema in kubernetes-validate: their pod templates are validated as core/v1
# PodTemplates, their own fields against the allow-lists below.
CRD_KINDS = {"PyTorchJob", "ServiceMonitor", "ScaledObject"}


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

@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("case", EXAMPLE_CASES)
def test_helm_lint_strict(helm, case, version):
    done = run_helm(helm, "lint", "--strict", "--kube-version", version, str(CHART), *CASES[case])
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
            assert (comp == "triton" and c["name"] == "triton") or \
                   (comp == "training" and c["name"] in ("train", "pytorch")), \
                f"{obj['kind']}/{obj['metadata']['name']} container {c['name']} asks for a GPU"
        # GPUs are whole devices: never a request without the same limit, never fractions.
        assert GPU not in c.get("resources", {}).get("requests", {})


def test_gpu_counts(helm):
    docs = render_case(helm, "everything")
    triton = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]
    assert gpu_limit(triton["containers"][0]) == 1
    # TensorRT engines are built by Triton itself on load: no other container of the pod holds a GPU.
    assert not [c["name"] for c in triton.get("initContainers", []) if gpu_limit(c)]
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
    trains = [c for _, _, c, _ in containers(docs) if c["name"] in ("train", "pytorch")]
    assert len(trains) == 4  # the Job, the CronJob, the PyTorchJob's master and worker
    for c in trains:
        script = c["command"][-1]
        assert 'torchrun --nproc-per-node "$GPUS" -m cdface.cli retrain' in script and "--steps train" in script
        assert "--set 'data.path=/data/glint360k'" in script
    assert one(docs, "PyTorchJob", "-train-1")["spec"]["nprocPerNode"] == "8"
    for kind in ("train", "pipeline"):
        assert one(docs, "CronJob", f"-retrain-{kind}")["spec"]["concurrencyPolicy"] == "Forbid"


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
    assert tr["image"] == "nvcr.io/nvidia/tritonserver:25.08-py3"
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
                # only the in-chart PostgreSQL's URL, with no password at all: libpq reads PGPASSWORD
                assert "PGPASSWORD" not in e["value"] and not re.search(r"//[^@/]*:[^@/]*@", e["value"])
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
    assert next(yaml.safe_load_all(again.stdout))["data"]["key-pepper"] != first["data"]["key-pepper"]
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
    assert {c for c, _ in pods} >= {"gateway", "triton", "postgresql", "pipeline", "training"}
    for target, ports in (("triton", (8000, 8001)), ("postgresql", (5432,))):
        policy = policies[target]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        # The policy governs exactly the target's pods.
        governed = {c for c, labels in pods if selector_matches(policy["spec"]["podSelector"], labels)}
        assert governed == {target}
        for comp, labels in pods:
            for port in ports:
                assert allowed(policy, labels, port) == (comp in ("gateway", "pipeline")), (target, comp, port)
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
    (["--set", "training.publish.backend=tensorrt_plan"], "/training/publish/backend"),
    (["--set", "triton.image.tag=24.08-py3"], "/triton/image"),
    (["--set", "triton.image.tag=25.06-py3"], "/triton/image"),
    (["--set", "triton.modelControl.header=X Bad"], "/triton/modelControl/header"),
    (["--set", "gateway.shadowShare=1.5"], "/gateway/shadowShare"),
])
def test_schema_refuses_wrong_values(helm, args, message):
    done = run_helm(helm, "template", "x", str(CHART), *args)
    assert done.returncode != 0, f"accepted {args}"
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "training.job.enabled=true", "--set", "database.mode=postgresql"], "training.dataset.existingClaim"),
    (["--set", "training.cronJob.enabled=true", "--set", "training.dataset.existingClaim=d"], "database.mode=sqlite"),
    (["--set", "training.job.enabled=true", "--set", "training.dataset.existingClaim=d", "--set",
      "database.mode=postgresql", "--set", "training.activeDeadlineSeconds.pipeline=3600", "--set",
      "training.activeDeadlineSeconds.train=3600"], "training.activeDeadlineSeconds.pipeline must exceed"),
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

def _retraining_pods(docs: list[dict], kind: str) -> dict[str, dict]:
    """Pod spec of each retraining object of `kind` (Job or CronJob), by object name."""
    return {obj["metadata"]["name"]: tpl["spec"] for obj, tpl in pod_templates(docs)
            if obj["kind"] == kind and component(tpl["metadata"]["labels"]) in ("training", "pipeline")}


def test_retraining_commands_parse(helm):
    """What the retraining containers run is valid shell (the real sh parses it), no script files:
    the `cdface retrain` command is the one way to run a step."""
    docs = render_case(helm, "everything")
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-scripts")]
    scripts = [c["command"] for _, tpl, c, _ in containers(docs) if component(tpl["metadata"]["labels"]) in
               ("training", "pipeline")]
    assert len(scripts) == 8  # Job, CronJob: train, wait, pipeline; PyTorchJob: master, worker
    for command in scripts:
        assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3, command
        done = subprocess.run(["sh", "-n", "-c", command[2]], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)


def test_retraining_renders_only_when_asked(helm):
    default = render_case(helm, "default")
    assert not [d for d in default if d["kind"] in ("Job", "CronJob", "PyTorchJob")]
    one_node = render_case(helm, "one-gpu-node")
    assert sorted(d["metadata"]["name"] for d in one_node if d["kind"] in ("Job", "CronJob", "PyTorchJob")) == \
        ["faces-cdface-retrain-pipeline", "faces-cdface-retrain-train"]
    jobs = sorted(d["metadata"]["name"] for d in render_case(helm, "everything") if d["kind"] == "Job")
    assert jobs == ["faces-cdface-run-1", "faces-cdface-train-1"]


# The steps of one run, as `cdface retrain --steps` takes them.
TRAIN_STEPS = "--steps train"
PIPELINE_STEPS = "--steps eval,export,publish,load,reembed,promote"


@pytest.mark.parametrize("kind", ["Job", "CronJob"])
def test_gpus_are_held_only_while_training(helm, kind):
    """A run is two pods: the train step alone holds GPUs; the CPU steps run in a pod without any
    GPU, which waits for the train step's completion marker on the shared run volume."""
    docs = render_case(helm, "everything")
    pods = _retraining_pods(docs, kind)
    assert len(pods) == 2, list(pods)
    train = next(p for p in pods.values() if p["containers"][0]["name"] == "train")
    pipeline = next(p for p in pods.values() if p["containers"][0]["name"] == "pipeline")
    # GPUs: the train container only, and no step other than train runs there.
    assert gpu_limit(train["containers"][0]) == 8 and not train.get("initContainers")
    assert TRAIN_STEPS in train["containers"][0]["command"][2]
    assert "--steps" not in train["containers"][0]["command"][2].replace(TRAIN_STEPS, "")
    assert not [c["name"] for c in pipeline.get("initContainers", []) + pipeline["containers"] if gpu_limit(c)]
    assert PIPELINE_STEPS in pipeline["containers"][0]["command"][2]
    assert {v["name"] for v in pipeline["volumes"]} == {"checkpoints", "models", "tmp"}  # no dataset, no dshm
    assert "models" not in {v["name"] for v in train["volumes"]}
    # Both mount the same run volume; the pipeline waits for the marker the train step writes there.
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for p in (train, pipeline)
             for v in p["volumes"]}
    assert claim["checkpoints"] == "faces-cdface-checkpoints"
    wait = pipeline["initContainers"]
    assert [c["name"] for c in wait] == ["wait-for-train"]
    assert 'until [ -f "/checkpoints/${RUN_ID}/steps/train.json" ]' in wait[0]["command"][2]
    for c in (train["containers"][0], pipeline["containers"][0]):
        assert '--run-id "$RUN_ID" --work-dir /checkpoints' in c["command"][2]
    # the pipeline sits on any node (no GPU nodeSelector of training's)
    assert train["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "nodeSelector" not in pipeline


def test_steps_run_in_a_real_shell_and_wait_for_the_marker(helm, tmp_path):
    """The rendered wait runs in sh: it loops while the marker is missing and ends once the train
    step's marker exists (the run volume is a temporary directory here, the command unchanged)."""
    docs = render_case(helm, "everything")
    wait = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    script = wait.replace("/checkpoints/", f"{tmp_path}/").replace("sleep 60", "sleep 0.05")
    proc = subprocess.Popen(["sh", "-c", script], env={"RUN_ID": "1", "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)  # no marker: still waiting
        (tmp_path / "1" / "steps").mkdir(parents=True)
        (tmp_path / "1" / "steps" / "train.json").write_text("{}")
        assert proc.wait(timeout=10) == 0
        assert "run 1: waiting for" in proc.stdout.read()
    finally:
        if proc.poll() is None:  # a failed check must not leave the loop running
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kind", ["Job", "CronJob"])
def test_retraining_jobs_have_deadlines_and_a_failure_policy(helm, kind):
    docs = render(helm, *CASES["everything"], "--set", "training.activeDeadlineSeconds.train=7200",
                  "--set", "training.activeDeadlineSeconds.pipeline=9000", "--set", "training.job.backoffLimit=3",
                  "--set", "training.cronJob.backoffLimit=4")
    specs = {}
    for d in docs:
        if d["kind"] == kind and component(d["metadata"]["labels"]) in ("training", "pipeline"):
            spec = d["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else d["spec"]
            specs[component(d["metadata"]["labels"])] = spec
    assert set(specs) == {"training", "pipeline"}
    assert specs["training"]["activeDeadlineSeconds"] == 7200
    assert specs["pipeline"]["activeDeadlineSeconds"] == 9000
    for spec in specs.values():
        assert spec["backoffLimit"] == (3 if kind == "Job" else 4)
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
        rules = spec["podFailurePolicy"]["rules"]
        # exit 2 (a refused gate, bad input): fail the Job at once, no retry
        assert rules[0] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}
        # evicted or preempted: not a failure of the run
        assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert len(rules) == 2


def _run_id_prefix(command: list[str]) -> str:
    """The shell the command runs before its first `exec` / `echo`: where RUN_ID is set."""
    script = command[2]
    return script[:min(i for i in (script.find("exec "), script.find("echo ")) if i >= 0)]


def test_run_ids_are_stable_across_retries(helm, tmp_path):
    docs = render_case(helm, "everything")
    # CronJob: each container derives RUN_ID from its Job's name (the pod's job-name label, the same
    # in every retry of a pod), with one expression in both CronJobs.
    cron = [(obj, c) for obj, tpl, c, _ in containers(docs) if obj["kind"] == "CronJob"
            and component(tpl["metadata"]["labels"]) in ("training", "pipeline")]
    assert len(cron) == 3
    prefixes = {_run_id_prefix(c["command"]) for _, c in cron}
    assert prefixes == {'RUN_ID="${JOB_NAME##*-}" && '}
    for _, c in cron:
        env = {e["name"]: e for e in c["env"]}
        assert "RUN_ID" not in env
        field = env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "metadata.labels['batch.kubernetes.io/job-name']"
    # The CronJob controller names a scheduled run's Jobs <cronjob>-<scheduled minutes>: both CronJobs'
    # Jobs of one schedule derive the same id (run in a real shell), whatever the names before it.
    names = {obj["metadata"]["name"] for obj, _ in cron}
    assert names == {"faces-cdface-retrain-train", "faces-cdface-retrain-pipeline"}
    scheduled = [c["spec"]["schedule"] for c in docs if c["kind"] == "CronJob" and c["metadata"]["name"] in names]
    assert len(set(scheduled)) == 1
    ids = set()
    for name in names:
        done = subprocess.run(["sh", "-c", _run_id_prefix(one(docs, "CronJob", name)["spec"]["jobTemplate"]["spec"][
            "template"]["spec"]["containers"][0]["command"]) + 'echo "$RUN_ID"'],
            env={"JOB_NAME": f"{name}-29423520", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        ids.add(done.stdout.strip())
    assert ids == {"29423520"}
    # Job: the runId value, literally, in both Jobs.
    for name in ("faces-cdface-train-1", "faces-cdface-run-1"):
        pod = one(docs, "Job", name)["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["RUN_ID"] == "1" and "JOB_NAME" not in env and _run_id_prefix(c["command"]) == ""


# ---------- documented commands ----------

def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with their backslash continuations joined, each with its first line number."""
    out, buf, start = [], "", 0
    for n, line in lines:
        text = line.strip()
        if not buf:
            start = n
        buf = f"{buf} {text}".strip()
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        out.append((start, buf))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _helm_args(command: str) -> list[str]:
    """The values a documented command gives the chart: --set / --set-string pairs and repository
    values files (-f), in order. Release, chart, namespace and --reuse-values say nothing about values."""
    args: list[str] = []
    tokens = shlex.split(command)
    for i, tok in enumerate(tokens):
        if tok in ("--set", "--set-string"):
            args += [tok, tokens[i + 1] if i + 1 < len(tokens) else ""]
        elif tok in ("-f", "--values"):
            path = ROOT / tokens[i + 1]
            if path.is_file():  # my-values.yaml and the like are the reader's own
                args += ["-f", str(path)]
    return args


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, helm args) for every helm command with values that docs/deploy.md shows in a
    code block or an inline code span, and that the examples show in their comments."""
    found = []
    in_block, block = False, []
    for n, line in enumerate(DEPLOY_DOC.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if in_block:
                for start, cmd in _joined(block):
                    if cmd.startswith("helm ") and "--set" in cmd:
                        found.append((f"deploy.md:{start}", cmd))
            in_block, block = not in_block, []
        elif in_block:
            block.append((n, line))
        else:
            found += [(f"deploy.md:{n}", span) for span in re.findall(r"`([^`]*--set[^`]*)`", line)]
    for example in sorted(EXAMPLES.glob("*.yaml")):
        comments = [(n, line.strip()[1:]) for n, line in enumerate(example.read_text().splitlines(), 1)
                    if line.strip().startswith("#")]
        for start, cmd in _joined(comments):
            if cmd.startswith("helm "):
                found.append((f"{example.name}:{start}", cmd))
    return [(where, cmd, _helm_args(cmd)) for where, cmd in found]


DOC_COMMANDS = _documented_commands()


def test_every_documented_set_is_parsed():
    """No --set hides where the parser does not look (a wrapped inline span, a comment fragment)."""
    doc_sets = DEPLOY_DOC.read_text().count("--set")
    parsed = sum(cmd.count("--set") for where, cmd, _ in DOC_COMMANDS if where.startswith("deploy.md"))
    assert parsed == doc_sets, "a --set in docs/deploy.md sits outside a helm command or one-line code span"
    for example in EXAMPLES.glob("*.yaml"):
        in_comments = sum(line.count("--set") for line in example.read_text().splitlines()
                          if line.strip().startswith("#"))
        parsed = sum(cmd.count("--set") for where, cmd, _ in DOC_COMMANDS if where.startswith(example.name + ":"))
        assert parsed == in_comments, example.name
    assert any(where.startswith("deploy.md") for where, _, _ in DOC_COMMANDS)
    # Commands are rendered as written: placeholders would not render, so docs show concrete values.
    for where, _, args in DOC_COMMANDS:
        assert not [a for a in args if re.search(r"<[^>]*>", a)], f"{where}: a placeholder in {args}"
        assert all("=" in v for flag, v in zip(args, args[1:]) if flag.startswith("--set")), f"{where}: {args}"
    assert any(where.startswith("multi-gpu-postgresql") and "training.steps.train=false" in cmd
               for where, cmd, _ in DOC_COMMANDS)


@pytest.mark.parametrize("where, command, args", DOC_COMMANDS, ids=[w for w, _, _ in DOC_COMMANDS])
def test_documented_command_renders(helm, where, command, args):
    lint = run_helm(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *args)
    assert lint.returncode == 0 and "funcMap fail" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    docs = render(helm, *args)
    _assert_mounts_resolve(docs, where)


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
def test_documented_commands_validate(helm, kubernetes_validate, tmp_path, version):
    """All documented commands' manifests in one kubernetes-validate run per version. Most objects
    come out the same from several commands: each distinct object is validated once."""
    files, seen = [], set()
    for i, (where, _, args) in enumerate(DOC_COMMANDS):
        docs = []
        for d in _validation_input(render(helm, *args)):
            key = json.dumps(d, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(d)
        path = tmp_path / f"command-{i}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append((path, len(docs), where))
    done = subprocess.run([kubernetes_validate, "--strict", "-k", version, *(str(f) for f, n, _ in files if n)],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    bad = [line for line in out.splitlines() if not line.startswith("INFO")]
    assert done.returncode == 0 and not bad, out
    for path, count, where in files:
        assert out.count(f"{path} passed for resource ") == count, where


# ---------- pods are whole ----------

def _assert_mounts_resolve(docs: list[dict], where: str):
    """Every volumeMount names a volume of its pod (a schema cannot see a missing one)."""
    for obj, tpl, c, _ in containers(docs):
        volumes = {v["name"] for v in tpl["spec"].get("volumes", [])}
        volumes |= {v["metadata"]["name"] for v in obj["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: {obj['kind']}/{obj['metadata']['name']}:{c['name']} mounts " \
                                         f"{m['name']}, which its pod does not define"


@pytest.mark.parametrize("case", list(CASES))
def test_volume_mounts_resolve(helm, case):
    _assert_mounts_resolve(render_case(helm, case), case)


def test_multi_node_follow_up_keeps_the_training_data(helm):
    """The documented follow-up (a publish Job beside the PyTorchJob) used to drop the data volume."""
    docs = render(helm, "-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"), "--set", "training.job.enabled=true",
                  "--set-string", "training.job.runId=1", "--set", "training.steps.train=false")
    job = one(docs, "PyTorchJob", "-train-1")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert {"data", "checkpoints", "dshm"} <= {v["name"] for v in pod["volumes"]}
        assert "models" not in {v["name"] for v in pod["volumes"]}  # training only: no claim it does not use
    # the rest of the run: the pipeline Job only (no train Job of its own), waiting for the PyTorchJob's marker
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Job"] == ["faces-cdface-run-1"]
    pipeline = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]
    assert [c["name"] for c in pipeline["initContainers"]] == ["wait-for-train"]
    assert "data" not in {v["name"] for v in pipeline["volumes"]}
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in master["env"]}["RUN_ID"] == "1"
    done = run_helm(helm, "template", "x", str(CHART), "--set", "training.multiNode.enabled=true",
                    "--set", "training.steps.train=false")
    assert done.returncode != 0 and "training.dataset.existingClaim" in done.stderr


# ---------- Triton: engine cache, Services, autoscaling ----------

def _volumes(docs: list[dict]):
    for obj, tpl in pod_templates(docs):
        for v in tpl["spec"].get("volumes", []):
            yield obj, v


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_path_unless_asked(helm, case):
    docs = render_case(helm, case)
    assert not [v["name"] for _, v in _volumes(docs) if "hostPath" in v]
    # The default TensorRT engine cache works on a fresh node under Pod Security restricted.
    if case == "default":
        trt = render(helm, "--set", "triton.tensorrt.enabled=true")
        cache = [v for _, v in _volumes(trt) if v["name"] == "engine-cache"]
        assert cache and "emptyDir" in cache[0] and not [v for _, v in _volumes(trt) if "hostPath" in v]


def test_versions_published_with_tensorrt_on_get_the_accelerator_and_the_cache_triton_mounts(helm):
    """Triton builds a new version's engine when it loads it, into the cache it mounts: the pipeline publishes
    into the repository Triton serves with the accelerator asked for, so no engine is prepared beforehand."""
    def pipeline_command(*args: str) -> str:
        pods = _retraining_pods(render(helm, *CASES["everything"], *args), "Job")
        return next(p for p in pods.values() if p["containers"][0]["name"] == "pipeline")["containers"][0][
            "command"][2]

    assert "--tensorrt-cache" not in pipeline_command("--set", "triton.tensorrt.enabled=false")
    with_trt = render(helm, *CASES["everything"], "--set", "triton.tensorrt.enabled=true")
    assert "--tensorrt-cache /engine-cache" in pipeline_command("--set", "triton.tensorrt.enabled=true")
    triton = one(with_trt, "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "engine-cache", "mountPath": "/engine-cache"} in triton["volumeMounts"]


def test_host_path_engine_cache_is_handed_to_triton(helm):
    docs = render(helm, "--set", "triton.tensorrt.enabled=true", "--set", "triton.tensorrt.engineCache.type=hostPath")
    pod = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]
    hp = [v for v in pod["volumes"] if "hostPath" in v]
    assert [v["name"] for v in hp] == ["engine-cache"]
    [owner] = pod["initContainers"]
    assert owner["name"] == "engine-cache-owner"
    psc = pod["securityContext"]
    assert owner["command"] == ["chown", f"{psc['runAsUser']}:{psc['runAsGroup']}", "/engine-cache"]
    sc = owner["securityContext"]
    # root, but nothing beyond changing an owner
    assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    triton = pod["containers"][0]
    assert "runAsUser" not in triton["securityContext"]  # the pod's uid 1000, the directory's new owner
    assert {"name": "engine-cache", "mountPath": "/engine-cache"} in triton["volumeMounts"]
    # a PVC cache: the chart's claim, or the one given
    pvc = render(helm, "--set", "triton.tensorrt.enabled=true", "--set", "triton.tensorrt.engineCache.type=pvc")
    claim = one(pvc, "PersistentVolumeClaim", "-engine-cache")
    pod = one(pvc, "Deployment", "-triton")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["engine-cache"]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    assert not pod.get("initContainers")


def test_triton_grpc_headless_service_and_gateway_target(helm):
    for case in ("default", "multi-gpu-postgresql"):
        docs = render_case(helm, case)
        grpc = one(docs, "Service", "-triton-grpc")
        assert grpc["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in grpc["spec"]["ports"]] == [8001]
        assert grpc["spec"]["ports"][0]["targetPort"] == "grpc"
        assert not grpc["spec"].get("publishNotReadyAddresses")  # inference goes to ready pods only
        triton = one(docs, "Deployment", "-triton")["spec"]["template"]["metadata"]["labels"]
        assert selector_matches({"matchLabels": grpc["spec"]["selector"]}, triton)
        # The ClusterIP Service stays for HTTP and metrics.
        cluster_ip = one(docs, "Service", "-triton")
        assert cluster_ip["spec"].get("clusterIP") != "None"
        assert {p["name"] for p in cluster_ip["spec"]["ports"]} >= {"http", "metrics"}
        for obj, _, c, _ in containers(docs):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "CDFACE_SERVE_TRITON_URL" in env:
                assert env["CDFACE_SERVE_TRITON_URL"] == \
                    f"dns:///{grpc['metadata']['name']}.cdface.svc.cluster.local:8001", obj["metadata"]["name"]
    # Connections age out, so clients re-resolve the name and find pods added by a scale-up.
    args = one(render_case(helm, "default"), "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0][
        "args"]
    assert "--grpc-max-connection-age=300000" in args and "--grpc-max-connection-age-grace=30000" in args
    # The model-control Service reaches unready pods too (a pod with nothing to serve is unready).
    pods = one(render_case(helm, "default"), "Service", "-triton-pods")
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in pods["spec"]["ports"]} == {8000, 8001}  # the load step speaks gRPC


def test_triton_autoscaling(helm):
    assert not [d for d in render_case(helm, "everything") if d["kind"] in ("ScaledObject",) or
                (d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"].endswith("-triton"))]
    docs = render(helm, "--set", "triton.autoscaling.enabled=true", "--set", "triton.autoscaling.maxReplicas=6")
    hpa = one(docs, "HorizontalPodAutoscaler", "-triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment", "-triton")["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "triton_queue_time_us"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "10000"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert "replicas" not in one(docs, "Deployment", "-triton")["spec"]  # the HPA owns the count
    keda = render(helm, "--set", "triton.autoscaling.enabled=true", "--set", "triton.autoscaling.provider=keda")
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"]  # KEDA makes its own
    so = one(keda, "ScaledObject", "-triton")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(so["spec"]) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                               "cooldownPeriod", "advanced", "triggers"}
    assert so["spec"]["scaleTargetRef"] == {"name": one(keda, "Deployment", "-triton")["metadata"]["name"]}
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    assert "nv_inference_queue_duration_us" in trigger["metadata"]["query"]
    assert 'namespace="cdface"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "10000"
    assert "replicas" not in one(keda, "Deployment", "-triton")["spec"]
    done = run_helm(helm, "template", "x", str(CHART), "--set", "triton.autoscaling.enabled=true",
                    "--set", "triton.autoscaling.minReplicas=5", "--set", "triton.autoscaling.maxReplicas=2")
    assert done.returncode != 0 and "minReplicas" in done.stderr


# ---------- the gateway ----------

@pytest.mark.parametrize("case", list(CASES))
def test_gateway_readiness_does_not_depend_on_triton(helm, case):
    docs = render_case(helm, case)
    pod = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    gw = pod["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Nothing waits for Triton before the gateway runs: no init container at all.
    assert not pod.get("initContainers")
    assert [c["name"] for c in pod["containers"]] == ["gateway"]


def test_gateway_startup_budget_follows_gallery_load_time(helm):
    gw = one(render_case(helm, "default"), "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    probe = gw["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    # ~7 s per million faces (measured: 100k in 0.65-0.78 s on 2 cores): 2 minutes covers 10M with
    # room, and no new gateway waits ten minutes to be declared dead.
    assert budget == 120
    assert 10 * 7 < budget < 600
    values = (CHART / "values.yaml").read_text()
    assert "0.65-0.78 s" in values and "7 s per million" in values


def test_gateway_graceful_shutdown(helm):
    pod = one(render_case(helm, "default"), "Deployment", "-gateway")["spec"]["template"]["spec"]
    gw = pod["containers"][0]
    sleep = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    env = {e["name"]: e.get("value") for e in gw["env"]}
    assert sleep == 5 and pod["terminationGracePeriodSeconds"] == 30
    assert env["CDFACE_SERVE_GRACEFUL_TIMEOUT_S"] == "20"  # 30 - 5 (preStop) - 5 (margin)
    longer = one(render(helm, "--set", "gateway.terminationGracePeriodSeconds=90",
                        "--set", "gateway.preStopSleepSeconds=10"), "Deployment", "-gateway")
    env = {e["name"]: e.get("value") for e in longer["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CDFACE_SERVE_GRACEFUL_TIMEOUT_S"] == "75"
    done = run_helm(helm, "template", "x", str(CHART), "--set", "gateway.terminationGracePeriodSeconds=10",
                    "--set", "gateway.preStopSleepSeconds=8")
    assert done.returncode != 0 and "terminationGracePeriodSeconds" in done.stderr
    tr = one(render_case(helm, "default"), "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]
    assert tr["lifecycle"]["preStop"]["sleep"]["seconds"] == 5 and "--exit-timeout-secs=20" in tr["args"]


def test_gateway_cpu_request_is_realistic(helm):
    gw = one(render_case(helm, "multi-gpu-postgresql"), "Deployment", "-gateway")["spec"]["template"]["spec"][
        "containers"][0]
    # The HPA's percentage is of the request: a request far below one replica's real use scales at idle.
    assert gw["resources"]["requests"]["cpu"] in ("2", 2)
    hpa = one(render_case(helm, "multi-gpu-postgresql"), "HorizontalPodAutoscaler", "-gateway")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("args", [
    ["--set", "gateway.settings.auth=false"],
    ["--set", "gateway.extraEnv[0].name=CDFACE_SERVE_AUTH", "--set-string", "gateway.extraEnv[0].value=false"],
])
def test_auth_off_needs_insecure(helm, args):
    done = run_helm(helm, "template", "x", str(CHART), *args)
    assert done.returncode != 0 and "insecure" in done.stderr, done.stderr
    # The template refuses it too, should the schema be skipped.
    done = run_helm(helm, "template", "x", str(CHART), "--skip-schema-validation", *args)
    assert done.returncode != 0 and "gateway.insecure=true" in done.stderr, done.stderr
    docs = render(helm, *args, "--set", "gateway.insecure=true")
    env = {e["name"]: e.get("value") for e in one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env.get("CDFACE_SERVE_AUTH") == "false"
    # A string is not a boolean: --set-string cannot slip past the schema's check.
    done = run_helm(helm, "template", "x", str(CHART), "--set-string", "gateway.settings.auth=false")
    assert done.returncode != 0 and "auth" in done.stderr


# ---------- the Ingress ----------

def _size_bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)", size.strip().lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2)]


def _upload_limit(docs: list[dict]) -> int:
    env = {e["name"]: e.get("value") for e in one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    return int(env["CDFACE_SERVE_MAX_REQUEST_BYTES"])


@pytest.mark.parametrize("case", list(CASES) + ["ingress-default", "ingress-large"])
def test_ingress_admits_the_gateway_upload_limit_and_only_v1(helm, case):
    if case == "ingress-default":
        docs = render(helm, "--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.className=nginx")
    elif case == "ingress-large":
        docs = render(helm, "-f", str(EXAMPLES / "one-gpu-node.yaml"),
                      "--set", "gateway.settings.max_request_bytes=104857600")
    else:
        docs = render_case(helm, case)
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    if case in ("one-gpu-node", "multi-gpu-postgresql", "ingress-default", "ingress-large"):
        assert len(ingresses) == 1
    for ing in ingresses:
        size = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert _size_bytes(size) >= _upload_limit(docs) >= 1024 * 1024, (size, _upload_limit(docs))
        paths = [(p["path"], p["pathType"]) for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        assert paths and set(paths) == {("/v1", "Prefix")}, paths
    if case == "ingress-large":
        assert _size_bytes(ingresses[0]["metadata"]["annotations"][
            "nginx.ingress.kubernetes.io/proxy-body-size"]) == 104857600


def test_ingress_refuses_a_body_limit_below_the_gateway(helm):
    done = run_helm(helm, "template", "x", str(CHART), "--set", "gateway.ingress.enabled=true",
                    "--set", "gateway.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-body-size=1m")
    assert done.returncode != 0 and "max_request_bytes" in done.stderr, done.stderr
    # Exposed paths are a value.
    docs = render(helm, "--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.paths[0].path=/v1",
                  "--set", "gateway.ingress.paths[0].pathType=Prefix", "--set", "gateway.ingress.paths[1].path=/docs",
                  "--set", "gateway.ingress.paths[1].pathType=Exact")
    ing = one(docs, "Ingress", "-gateway")
    assert [p["path"] for p in ing["spec"]["rules"][0]["http"]["paths"]] == ["/v1", "/docs"]


# ---------- scheduling ----------

@pytest.mark.parametrize("case", ["one-gpu-node", "multi-gpu-postgresql", "everything"])
def test_serving_outranks_training(helm, case):
    docs = render_case(helm, case)
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    seen = set()
    for obj, tpl in pod_templates(docs):
        comp = component(tpl["metadata"]["labels"])
        name = tpl["spec"].get("priorityClassName")
        assert name in classes, f"{obj['kind']}/{obj['metadata']['name']} has priorityClassName {name}"
        seen.add(comp)
        tier = "training" if comp in ("training", "pipeline") else "serving"
        assert classes[name]["metadata"]["name"].endswith(f"-{tier}"), (comp, name)
    assert {"gateway", "triton"} <= seen and seen & {"training", "pipeline"}
    serving = next(c for n, c in classes.items() if n.endswith("-serving"))
    training = next(c for n, c in classes.items() if n.endswith("-training"))
    assert serving["value"] > training["value"] and training["preemptionPolicy"] == "Never"
    assert not serving["globalDefault"] and not training["globalDefault"]


def test_priority_class_names_are_values(helm):
    docs = render(helm, "--set", "training.job.enabled=true", "--set", "training.dataset.existingClaim=d",
                  "--set", "database.mode=postgresql", "--set", "database.postgresql.priorityClassName=db-high",
                  "--set", "gateway.priorityClassName=serving-high", "--set", "triton.priorityClassName=gpu-serving",
                  "--set", "training.priorityClassName=batch-low")
    assert not [d for d in docs if d["kind"] == "PriorityClass"]
    names = {component(tpl["metadata"]["labels"]): tpl["spec"]["priorityClassName"] for _, tpl in pod_templates(docs)}
    assert names == {"gateway": "serving-high", "triton": "gpu-serving", "postgresql": "db-high",
                     "training": "batch-low", "pipeline": "batch-low"}
    assert not [tpl for _, tpl in pod_templates(render_case(helm, "default")) if "priorityClassName" in tpl["spec"]]


def _claims(pod: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v}


@pytest.mark.parametrize("case", list(CASES))
def test_read_write_once_volumes_are_not_shared_across_nodes(helm, case):
    """A ReadWriteOnce claim mounted by pods of several workloads (the model repository; the run
    volume both retraining Jobs mount): all but Triton's are pinned to Triton's node."""
    docs = render_case(helm, case)
    rwo = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"
           and not {"ReadWriteMany", "ReadOnlyMany"} & set(d["spec"]["accessModes"])}
    triton = one(docs, "Deployment", "-triton")["spec"]["template"]
    for claim in rwo:
        users = [(obj, tpl) for obj, tpl in pod_templates(docs) if claim in _claims(tpl)]
        if len({obj["metadata"]["name"] for obj, _ in users}) < 2:
            continue
        for obj, tpl in users:
            if tpl is triton:
                continue
            terms = tpl["spec"].get("affinity", {}).get("podAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", [])
            assert any(t["topologyKey"] == "kubernetes.io/hostname" and
                       selector_matches(t["labelSelector"], triton["metadata"]["labels"]) for t in terms), \
                f"{obj['kind']}/{obj['metadata']['name']} shares ReadWriteOnce {claim} with Triton unpinned"
    if case == "one-gpu-node":
        gw = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
        assert "models" in {v["name"] for v in gw["volumes"]} and gw.get("affinity")
        # pinned to a tainted GPU node: it tolerates the taint Triton tolerates
        assert any(t["key"] == GPU for t in gw["tolerations"])


# ---------- the database ----------

@pytest.mark.parametrize("password", [None, "p@ss/w%rd:x?#&y"])
def test_database_url_carries_no_password(helm, password):
    args = ["--set", "database.mode=postgresql", "--set", "gateway.replicaCount=2"]
    if password:
        args += ["--set-string", f"database.postgresql.password={password}"]
    docs = render(helm, *args)
    secret = one(docs, "Secret", "-postgresql")
    stored = base64.b64decode(secret["data"]["password"]).decode()
    if password:
        assert stored == password
    else:
        assert re.fullmatch(r"[A-Za-z0-9]{32}", stored)
    for _, _, c, _ in containers(docs):
        env = {e["name"]: e for e in c.get("env", [])}
        if "CDFACE_SERVE_DATABASE_URL" in env:
            url = env["CDFACE_SERVE_DATABASE_URL"]["value"]
            assert url == "postgresql://cdface@faces-cdface-postgresql:5432/cdface", url
            assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                      "key": "password"}
    text = _render(helm, tuple(args))[0]
    assert stored not in text.replace(secret["data"]["password"], "")  # only in the Secret, base64-encoded
    existing = render(helm, "--set", "database.mode=postgresql", "--set", "database.postgresql.existingSecret=pg")
    assert not [d for d in existing if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-postgresql")]
    gw = one(existing, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in gw["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "password"}


def test_in_chart_postgresql(helm):
    docs = render_case(helm, "multi-gpu-postgresql")
    sts = one(docs, "StatefulSet", "-postgresql")
    pod = sts["spec"]["template"]["spec"]
    image = pod["containers"][0]["image"]
    assert re.fullmatch(r"docker\.io/library/postgres:1[67]\.\d+-\w+", image), image
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    pdb = one(docs, "PodDisruptionBudget", "-postgresql")
    assert pdb["spec"]["minAvailable"] == 1
    assert selector_matches(pdb["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    assert not [d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"].endswith("-backup")]


def test_postgresql_backup(helm):
    docs = render(helm, "-f", str(EXAMPLES / "multi-gpu-postgresql.yaml"),
                  "--set", "database.postgresql.backup.enabled=true")
    cron = one(docs, "CronJob", "-postgresql-backup")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert "pg_dump" in c["command"][2] and "-Fc" in c["command"][2]
    done = subprocess.run(["sh", "-n"], input=c["command"][2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {e["name"]: e for e in c["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    one(docs, "PersistentVolumeClaim", "-postgresql-backup")
    policy = one(docs, "NetworkPolicy", "-postgresql")
    assert allowed(policy, pod["metadata"]["labels"], 5432)
    assert not allowed(one(docs, "NetworkPolicy", "-triton"), pod["metadata"]["labels"], 8001)
    done = run_helm(helm, "template", "x", str(CHART), "--set", "database.postgresql.backup.enabled=true")
    assert done.returncode != 0 and "database.mode=postgresql" in done.stderr


# ---------- the gateway's request limits, logs and rate-limit counters ----------

def _gateway_env(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_micro_batching_is_off_by_default_and_set_from_the_gateway_settings(helm, monkeypatch):
    from cdface.serving.settings import Settings

    assert "CDFACE_SERVE_TRITON_MERGE_SLOTS" not in _gateway_env(render(helm))
    env = _gateway_env(render(helm, "--set", "gateway.settings.triton_merge_slots=2"))
    assert env["CDFACE_SERVE_TRITON_MERGE_SLOTS"]["value"] == "2"
    monkeypatch.setenv("CDFACE_SERVE_TRITON_MERGE_SLOTS", env["CDFACE_SERVE_TRITON_MERGE_SLOTS"]["value"])
    assert Settings().triton_merge_slots == 2  # the name the chart writes is the gateway's


def test_gateway_limits_and_json_logs_by_default(helm):
    env = _gateway_env(render(helm))
    assert env["CDFACE_SERVE_REQUEST_DEADLINE_S"]["value"] == "30"
    assert env["CDFACE_SERVE_MAX_CONCURRENT_REQUESTS"]["value"] == "64"
    assert env["CDFACE_SERVE_RATE_LIMIT"]["value"] == "600/minute"
    assert env["CDFACE_SERVE_LOG_FORMAT"]["value"] == "json"
    assert "CDFACE_SERVE_RATE_LIMIT_STORAGE" not in env  # per-replica memory unless a shared store is named


def test_shared_rate_limit_storage_comes_from_a_secret(helm):
    env = _gateway_env(render(helm, "--set", "gateway.rateLimitStorage.existingSecret=cdface-redis"))
    assert env["CDFACE_SERVE_RATE_LIMIT_STORAGE"]["valueFrom"]["secretKeyRef"] == {
        "name": "cdface-redis", "key": "rate-limit-storage"}


# ---------- retained crops: sealed with keys from a Secret ----------

def test_crop_keys_come_from_a_secret_and_are_absent_by_default(helm):
    def env(*args: str) -> dict[str, dict]:
        pod = one(render(helm, *args), "Deployment", "-gateway")["spec"]["template"]["spec"]
        return {e["name"]: e for e in pod["containers"][0]["env"]}

    assert "CDFACE_SERVE_CROP_KEYS" not in env()  # no key: the gateway retains no crop
    assert env("--set", "gateway.cropKeys.existingSecret=cdface-crops")["CDFACE_SERVE_CROP_KEYS"]["valueFrom"] == {
        "secretKeyRef": {"name": "cdface-crops", "key": "crop-keys"}}


# ---------- model upgrades: Triton's image and model control, what the gateway follows ----------

def _triton_release(image: str) -> tuple[int, int]:
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize("case", list(CASES))
def test_triton_image_is_past_the_2025_vulnerabilities(helm, case):
    triton = one(render_case(helm, case), "Deployment", "-triton")["spec"]["template"]["spec"]
    images = {c["image"] for c in triton.get("initContainers", []) + triton["containers"]}
    assert images and all(_triton_release(i) >= (25, 7) for i in images), images
    # The trainer's TensorRT is the Triton release's (an engine loads only in the TensorRT that built it).
    dockerfile = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    assert "ARG TENSORRT_VERSION=10.13.2.6" in dockerfile and '"tensorrt-cu13==${TENSORRT_VERSION}"' in dockerfile
    assert _triton_release(next(iter(images))) == (25, 8)  # the release whose TensorRT is 10.13.2.6 (CUDA 13.0)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_model_control_api_is_restricted_to_the_pipeline(helm):
    docs = render_case(helm, "everything")
    secret = one(docs, "Secret", "-triton-model-control")
    key = base64.b64decode(secret["data"]["model-control-key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key)
    name = secret["metadata"]["name"]
    triton = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]
    # Loading and unloading need the header with the key, over HTTP and gRPC (gRPC keys are lower case);
    # Kubernetes puts the key in from the environment, from the Secret.
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=face" in triton["args"]
    assert "--http-restricted-api=model-repository:X-Cdface-Model-Control=$(CDFACE_TRITON_CONTROL_KEY)" in \
        triton["args"]
    assert "--grpc-restricted-protocol=model-repository:x-cdface-model-control=$(CDFACE_TRITON_CONTROL_KEY)" in \
        triton["args"]
    assert _env(triton)["CDFACE_TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": name, "key": "model-control-key"}
    # Who may read the Secret: Triton and the pipeline pods, nobody else (not the gateway, not training).
    readers = set()
    for _, tpl in pod_templates(docs):
        if name in json.dumps(tpl):
            readers.add(component(tpl["metadata"]["labels"]))
    assert readers == {"triton", "pipeline"}
    gateway = one(docs, "Deployment", "-gateway")
    assert name not in json.dumps(gateway) and "CDFACE_TRITON_CONTROL" not in json.dumps(gateway)
    for _, tpl, c, is_init in containers(docs):
        if component(tpl["metadata"]["labels"]) == "pipeline" and not is_init:
            env = _env(c)
            assert env["CDFACE_TRITON_CONTROL_HEADER"]["value"] == "X-Cdface-Model-Control"
            assert env["CDFACE_TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": name, "key": "model-control-key"}
            # every Triton pod, ready or not (explicit mode: each pod loads a version only when told)
            assert env["CDFACE_SERVE_TRITON_URL"]["value"] == \
                "dns:///faces-cdface-triton-pods.cdface.svc.cluster.local:8001"
    # The header is a value; an existing Secret replaces the generated one everywhere.
    docs = render(helm, *CASES["everything"], "--set", "triton.modelControl.header=X-Ops-Key",
                  "--set", "triton.modelControl.existingSecret=ops-triton")
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-model-control")]
    args = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--grpc-restricted-protocol=model-repository:x-ops-key=$(CDFACE_TRITON_CONTROL_KEY)" in args
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for _, _, c, _ in containers(docs) for e in c.get("env", [])
            if e["name"] == "CDFACE_TRITON_CONTROL_KEY"]
    assert refs and set(refs) == {"ops-triton"}


def test_pipeline_reaches_the_gallery_database_and_crops(helm):
    docs = render(helm, *CASES["everything"], "--set", "gateway.cropKeys.existingSecret=crop-keys")
    pipeline = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]["containers"][0]
    env = _env(pipeline)
    assert env["CDFACE_SERVE_DATABASE_URL"]["value"] == "postgresql://cdface@faces-cdface-postgresql:5432/cdface"
    assert env["CDFACE_SERVE_MODEL_REPOSITORY"]["value"] == "/models" and env["CDFACE_SERVE_MODEL"]["value"] == "face"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "faces-cdface-postgresql"
    assert env["CDFACE_SERVE_CROP_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "crop-keys", "key": "crop-keys"}
    assert "CDFACE_SERVE_KEY_PEPPER" not in env  # API keys are the gateway's business only
    external = render(helm, *CASES["external-db"], "--set", "training.job.enabled=true",
                      "--set", "training.dataset.existingClaim=d")
    env = _env(one(external, "Job", "-run-1")["spec"]["template"]["spec"]["containers"][0])
    assert env["CDFACE_SERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "cdface-db",
                                                                              "key": "database-url"}
    assert "PGPASSWORD" not in env


def test_retraining_values_reach_the_command(helm):
    docs = render_case(helm, "everything")
    train = one(docs, "Job", "-train-1")["spec"]["template"]["spec"]["containers"][0]
    # the held-out sets (eval and promotion need them) inside the dataset's path
    assert "--set 'data.val=[/data/glint360k/lfw.bin,/data/glint360k/cfp_fp.bin,/data/glint360k/agedb_30.bin]'" \
        in train["command"][2]
    assert _env(train)["CDFACE_RETRAIN_TWO_STAGE"]["value"] == "true"
    pipeline = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]["containers"][0]
    assert "--backend onnxruntime_onnx --max-batch-size 32" in pipeline["command"][2]
    assert "--margin" not in pipeline["command"][2] and "CDFACE_RETRAIN_GRACE_S" not in _env(pipeline)
    docs = render(helm, *CASES["everything"], "--set", "training.promoteMargin=0.01", "--set",
                  "model.gracePeriodSeconds=7200", "--set", "training.autoPromote=false", "--set",
                  "training.twoStage=false", "--set", "training.dataset.heldOut={lfw.bin}")
    pipeline = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]["containers"][0]
    assert "--margin 0.01" in pipeline["command"][2]
    assert _env(pipeline)["CDFACE_RETRAIN_GRACE_S"]["value"] == "7200"
    # without promotion the run ends at a re-embedded candidate, for an operator to promote
    assert re.findall(r"--steps (\S+)", pipeline["command"][2]) == ["eval,export,publish,load,reembed"]
    train = one(docs, "Job", "-train-1")["spec"]["template"]["spec"]["containers"][0]
    assert "--set 'data.val=[/data/glint360k/lfw.bin]'" in train["command"][2]
    assert _env(train)["CDFACE_RETRAIN_TWO_STAGE"]["value"] == "false"


def test_gateway_follows_the_model_pointer_unless_pinned(helm):
    gw = _env(one(render_case(helm, "default"), "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert "CDFACE_SERVE_MODEL_VERSION" not in gw  # the store's pointer decides
    assert gw["CDFACE_SERVE_SHADOW_SHARE"]["value"] == "0.05"
    assert gw["CDFACE_SERVE_MODEL"]["value"] == "face"
    pinned = render(helm, "--set", "model.version=3", "--set", "gateway.shadowShare=0.2")
    gw = _env(one(pinned, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert gw["CDFACE_SERVE_MODEL_VERSION"]["value"] == "3" and gw["CDFACE_SERVE_SHADOW_SHARE"]["value"] == "0.2"


def test_tensorrt_engines_are_built_on_load_from_the_served_repository(helm):
    """With TensorRT, Triton serves the model repository retraining publishes into (no node-local
    copy filled only at pod start): a version loaded through the repository API is served, its
    engine built by ONNX Runtime's TensorRT accelerator on load and kept in the engine cache."""
    docs = render_case(helm, "everything")  # TensorRT on, engine cache on a shared volume
    triton = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]
    c = triton["containers"][0]
    assert "--model-repository=/models" in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models"
    assert mounts["engine-cache"] == {"name": "engine-cache", "mountPath": "/engine-cache"}  # writable
    assert "engine-repository" not in json.dumps(triton) and not triton.get("initContainers")
    # the pipeline publishes into that same claim
    pipeline = one(docs, "Job", "-run-1")["spec"]["template"]["spec"]
    assert {m["name"]: m["mountPath"] for m in pipeline["containers"][0]["volumeMounts"]}["models"] == "/models"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for p in (triton, pipeline) for v in p["volumes"]
              if v["name"] == "models"}
    assert claims == {"models": "faces-cdface-models"}
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-triton-scripts")]


@pytest.mark.slow
def test_rendered_model_control_flags_restrict_a_real_triton(helm, tmp_path):
    """The restricted-API flags exactly as the chart renders them (the key put in from the generated
    Secret, as Kubernetes expands $(VAR) in args), run by a real tritonserver: the repository API
    answers only with the key, over HTTP (X-Cdface-Model-Control) and gRPC (the lower-case key
    prefixed triton-grpc-protocol-); health and metadata stay open."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from cdface.devtools.triton_local import TritonServer

    docs = render_case(helm, "everything")
    key = base64.b64decode(one(docs, "Secret", "-triton-model-control")["data"]["model-control-key"]).decode()
    args = one(docs, "Deployment", "-triton")["spec"]["template"]["spec"]["containers"][0]["args"]
    restricted = [a.replace("$(CDFACE_TRITON_CONTROL_KEY)", key) for a in args if "restricted" in a]
    assert len(restricted) == 2 and all(key in a for a in restricted)

    class ChartFlagsTriton(TritonServer):
        def command(self, env):
            return super().command(env) + restricted

    (tmp_path / "repo").mkdir()
    with ChartFlagsTriton(tmp_path / "repo", explicit=True, log_path=tmp_path / "triton.log") as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for headers in (None, {"X-Cdface-Model-Control": "wrong"}, {"X-Other": key}):
                with pytest.raises(InferenceServerException, match="restricted"):
                    http.get_model_repository_index(headers=headers)
            assert http.get_model_repository_index(headers={"X-Cdface-Model-Control": key}) == []
            with pytest.raises(InferenceServerException, match="restricted"):
                grpc.get_model_repository_index()
            with pytest.raises(InferenceServerException, match="restricted"):
                grpc.get_model_repository_index(headers={"x-cdface-model-control": key})  # unprefixed
            index = grpc.get_model_repository_index(headers={"triton-grpc-protocol-x-cdface-model-control": key})
            assert list(index.models) == []
            assert http.is_server_live() and grpc.is_server_live()  # no key needed
        finally:
            http.close()
            grpc.close()


def test_model_commands_run_as_pipeline_pods(helm):
    """The operator's `cdface model` steps as a one-off Job, and the scheduled sync that unloads a
    version once nobody can call it: pipeline pods (database, repository, every Triton pod, the key)."""
    base = [*CASES["everything"], "--set", "model.gracePeriodSeconds=3600"]
    assert not [d for d in render(helm, *base) if d["metadata"]["name"].startswith("faces-cdface-model-")
                and d["kind"] in ("Job", "CronJob")]
    docs = render(helm, *base, "--set", "model.command.enabled=true", "--set", "model.command.id=promote-4",
                  "--set", "model.command.args={promote,face:4,--margin,0.01}",
                  "--set", "model.syncTriton.enabled=true")
    job = one(docs, "Job", "-model-promote-4")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["cdface", "model", "promote", "face:4", "--margin", "0.01",
                            "--triton-url", "$(CDFACE_SERVE_TRITON_URL)", "--grace-s", "3600"]
    env = _env(c)
    assert env["CDFACE_SERVE_TRITON_URL"]["value"] == "dns:///faces-cdface-triton-pods.cdface.svc.cluster.local:8001"
    assert env["CDFACE_TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "faces-cdface-triton-model-control"
    assert {m["name"]: m.get("readOnly", False) for m in c["volumeMounts"]}["models"] is False  # writes the policy
    assert component(job["spec"]["template"]["metadata"]["labels"]) == "pipeline"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]  # a refusal is final
    assert not gpu_limit(c)
    sync = one(docs, "CronJob", "-model-sync")
    cmd = sync["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["cdface", "model", "sync-triton", "--triton-url", "$(CDFACE_SERVE_TRITON_URL)", "--grace-s", "3600"]
    assert sync["spec"]["concurrencyPolicy"] == "Forbid"
    # `status` only reads: no Triton target
    status = render(helm, *CASES["everything"], "--set", "model.command.enabled=true")
    assert one(status, "Job", "-model-1")["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "cdface", "model", "status"]
    # refused: an unknown command, and SQLite (the gallery is inside the gateway pod)
    done = run_helm(helm, "template", "x", str(CHART), *CASES["everything"], "--set", "model.command.enabled=true",
                    "--set", "model.command.args={delete}")
    assert done.returncode != 0 and "/model/command/args" in done.stderr
    done = run_helm(helm, "template", "x", str(CHART), "--set", "model.syncTriton.enabled=true")
    assert done.returncode != 0 and "SQLite" in done.stderr
