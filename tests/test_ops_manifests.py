"""The deployment files in infra/: the Ray cluster launcher YAML validates against the schema that
ships with Ray, the KubeRay manifests carry what a GPU training cluster needs (and credentials only
as Secret references), and the GPU image installs what the code imports."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ops
ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SECRETISH = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.IGNORECASE)


def ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_cluster_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(raw, ray_schema())             # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` sees it, merged with the AWS defaults
    assert raw["provider"]["type"] == "aws" and raw["provider"]["cache_stopped_nodes"] is False
    gpu = raw["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and 0 < gpu["max_workers"] <= raw["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert raw["available_node_types"][raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert raw["idle_timeout_minutes"] > 0
    start = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start
    assert not any(SECRETISH.search(k) for k in json.dumps(raw.get("docker", {})).split('"'))
    assert {"--security-opt=no-new-privileges", "--cap-drop=ALL"} <= set(raw["docker"]["run_options"])


def test_cluster_launcher_never_opens_ssh_to_the_world(monkeypatch):
    """Ray 2.60 gives a security group it creates an SSH rule from 0.0.0.0/0, whatever
    provider.security_group says; it creates none when every node type names its groups
    (SecurityGroupIds), which then hold the user's CIDR. Ray's own bootstrap step is run on the
    prepared config, with no AWS credentials: it must return without calling AWS."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert "0.0.0.0/0" not in json.dumps(raw) and "::/0" not in json.dumps(raw)
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: Ray would create a group open to SSH"
    # the trap this avoids: the rules Ray writes into a group of its own
    ray_rules = json.dumps(aws_config._create_default_inbound_rules({"sg-x"}, []))
    assert "0.0.0.0/0" in ray_rules
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    cfg = prepare_config(copy.deepcopy(raw))
    before = copy.deepcopy(cfg["available_node_types"])
    assert aws_config._configure_security_group(cfg)["available_node_types"] == before


def test_schema_validation_catches_a_typo():
    """The check above is not vacuous: a misspelled key fails Ray's schema."""
    import jsonschema

    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    raw["idle_timeout_minuts"] = raw.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minuts"):
        jsonschema.validate(raw, ray_schema())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] != "Secret", f"{path}: Secrets are created from the shell, never committed"
            assert doc["apiVersion"] == {"NetworkPolicy": "networking.k8s.io/v1"}.get(doc["kind"], "ray.io/v1"), path
            out.append((path, doc))
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for path, doc in _docs():
        if doc["kind"] == "RayCluster":
            out.append((f"{path.name}:RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((f"{path.name}:RayJob", doc["spec"]["rayClusterSpec"]))
    return out


def test_kuberay_manifests_carry_the_required_fields():
    import ray

    specs = _cluster_specs()
    assert {name.split(":")[1] for name, _ in specs} == {"RayCluster", "RayJob"}
    for name, spec in specs:
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        ports = {p["containerPort"] for p in _containers(head["template"])[0]["ports"]}
        assert {6379, 8265} <= ports, name
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in _containers(g["template"]))]
        assert gpu_groups, f"{name}: no GPU worker group"
        for g in gpu_groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
            for c in _containers(g["template"]):
                lim, req = c["resources"]["limits"], c["resources"]["requests"]
                assert int(lim["nvidia.com/gpu"]) >= 1 and req["nvidia.com/gpu"] == lim["nvidia.com/gpu"], name
            mounts = {m["mountPath"] for c in _containers(g["template"]) for m in c.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}: NCCL needs a large /dev/shm"
        images = {c["image"] for grp in [head, *spec["workerGroupSpecs"]] for c in _containers(grp["template"])}
        assert len(images) == 1, f"{name}: head and workers must run the same image, got {images}"
        for grp in [head, *spec["workerGroupSpecs"]]:
            for c in _containers(grp["template"]):
                env = {e["name"]: e for e in c.get("env", [])}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env[var]["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "gammaray-s3" and ref["key"] == var, name
                for e in env.values():  # no credential as a literal value
                    assert not (SECRETISH.search(e["name"]) and "value" in e), f"{name}: {e['name']} is a literal"


def _pod_templates(path: Path, doc: dict) -> list[tuple[str, dict]]:
    """(name, pod template) of every pod a manifest makes: head, worker groups, a RayJob's submitter."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    out = [(f"{path.name}: head", spec["headGroupSpec"]["template"])]
    out += [(f"{path.name}: worker group {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        out.append((f"{path.name}: submitter", doc["spec"]["submitterPodTemplate"]))
    return out


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _restricted_violations(pod: dict) -> list[str]:
    """What breaks Kubernetes' "restricted" Pod Security Standard in a pod spec (the checks of
    https://kubernetes.io/docs/concepts/security/pod-security-standards/ that a manifest can fail)."""
    bad = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(key)
    for v in pod.get("volumes", []):
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']} of type {sorted(set(v) - {'name'})}")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            bad.append(f"{c['name']}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{c['name']}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}: capabilities are not drop [ALL]")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']}: no RuntimeDefault seccomp profile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']}: hostPort")
    return bad


def test_every_pod_meets_the_restricted_pod_security_standard():
    for path, doc in _docs():
        if doc["kind"] == "NetworkPolicy":
            continue
        for name, template in _pod_templates(path, doc):
            assert _restricted_violations(template["spec"]) == [], name
            user = template["spec"]["securityContext"]["runAsUser"]
            assert user == 1000, f"{name}: the image's user ray is uid 1000"  # Dockerfile.gpu: USER 1000:100
        # KubeRay's autoscaler sidecar takes its securityContext from autoscalerOptions
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        autoscaler = {"name": "autoscaler", "securityContext": spec["autoscalerOptions"]["securityContext"]}
        assert _restricted_violations({"containers": [autoscaler]}) == [], path.name


def test_the_restricted_check_is_not_vacuous():
    """The check above fails on an unhardened container (today's manifests had no securityContext)."""
    bare = {"containers": [{"name": "ray-head", "image": "x"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert len(_restricted_violations(bare)) == 5


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def test_network_policies_admit_only_the_clusters_own_pods():
    """GCS, dashboard/Jobs API and every other Ray port: the cluster's pods may connect to each
    other; the RayJob's submitter and the KubeRay operator may reach the Jobs API (8265) and nothing
    else; no address block, no rule open to every source, no Service outside the cluster."""
    docs = _docs()
    for path in sorted({p for p, _ in docs}):
        policies = [d for p, d in docs if p == path and d["kind"] == "NetworkPolicy"]
        clusters = [d for p, d in docs if p == path and d["kind"] != "NetworkPolicy"]
        assert len(policies) == 1 and len(clusters) == 1, f"{path.name}: one Ray cluster and its NetworkPolicy"
        policy, cluster = policies[0]["spec"], clusters[0]
        ray_pods = [t for name, t in _pod_templates(path, cluster) if not name.endswith("submitter")]
        own = policy["podSelector"]
        for template in ray_pods:
            assert _selects(own, template["metadata"]["labels"]), f"{path.name}: a Ray pod outside the policy"
        assert policy["policyTypes"] == ["Ingress"] and policy["ingress"], path.name
        submitters = [t["metadata"]["labels"] for name, t in _pod_templates(path, cluster) if name.endswith("submitter")]
        admitted_submitter = False
        for rule in policy["ingress"]:
            assert rule.get("from"), f"{path.name}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, path.name
                if peer.get("podSelector") == own and "namespaceSelector" not in peer:
                    continue  # the cluster's own pods: every port
                assert rule.get("ports") == [{"protocol": "TCP", "port": 8265}], f"{path.name}: {peer} beyond 8265"
                if "namespaceSelector" in peer:
                    assert _selects(peer["podSelector"], {"app.kubernetes.io/component": "kuberay-operator"}), path.name
                else:
                    assert any(_selects(peer["podSelector"], labels) for labels in submitters), path.name
                    admitted_submitter = True
        assert admitted_submitter == bool(submitters), f"{path.name}: the RayJob's submitter must reach 8265"
        spec = cluster["spec"]["rayClusterSpec"] if cluster["kind"] == "RayJob" else cluster["spec"]
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path.name


def test_rayjob_deletes_its_cluster_and_has_a_deadline():
    doc = next(yaml.safe_load_all((INFRA / "k8s" / "rayjob.yaml").read_text()))
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["entrypoint"].startswith("gammaray pretrain --config /etc/gammaray/config.yaml")
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never" and "command" not in submitter["containers"][0]  # KubeRay sets it
    head_image = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert submitter["containers"][0]["image"] == head_image
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == "gammaray-config"
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_gpu_image_installs_cuda_torch_deepspeed_and_the_project():
    text = (INFRA / "docker" / "Dockerfile.gpu").read_text()
    import ray

    assert f"ARG RAY_VERSION={ray.__version__}" in text
    assert re.search(r"BASE_IMAGE=rayproject/ray:\$\{RAY_VERSION\}-py311-gpu", text)
    assert 'TORCH_SPEC="torch==' in text and "download.pytorch.org/whl/cpu" not in text  # PyPI's CUDA build
    assert "pyproject.toml" in text and "'project']['dependencies']" in text  # deepspeed etc. from pyproject
    assert "import torch, deepspeed, ray, gammaray.app.cli" in text
    assert not re.search(r"^ENV .*(SECRET|ACCESS_KEY)", text, re.M)
    # the last USER is the base image's ray, numeric (runAsNonRoot can check it), without sudo
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "1000:100"
    assert "sed -i '/^ray[[:space:]]/d' /etc/sudoers" in text and "gpasswd -d ray sudo" in text
    assert text.index("RUN ! sudo -n true") > text.rindex("USER 1000:100")  # checked as that user, at build time
    for src in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY source {part} missing"
    ignore = (INFRA / "docker" / "Dockerfile.gpu.dockerignore").read_text()
    for pattern in ("**/.venv", "**/.env", "**/auth_token", "**/*.pem", "**/id_rsa*", "**/.ssh", "**/.netrc",
                    "**/.kube", "**/kubeconfig*", "**/*.tfstate", "**/.pypirc", "**/credentials"):
        assert pattern in ignore
    deps = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("deepspeed") for d in deps) and any(d.startswith("torch") for d in deps)
