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


def test_schema_validation_catches_a_typo():
    """The check above is not vacuous: a misspelled key fails Ray's schema."""
    import jsonschema

    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    raw["idle_timeout_minuts"] = raw.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minuts"):
        jsonschema.validate(raw, ray_schema())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1", path
            assert doc["kind"] != "Secret", f"{path}: Secrets are created from the shell, never committed"
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


def test_rayjob_deletes_its_cluster_and_has_a_deadline():
    doc = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["entrypoint"].startswith("gammaray pretrain --config /etc/gammaray/config.yaml")
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
    assert "import torch, deepspeed, ray, gammaray.cli" in text
    assert re.search(r"^USER ray$", text, re.M) and not re.search(r"^ENV .*(SECRET|ACCESS_KEY)", text, re.M)
    for src in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY source {part} missing"
    ignore = (INFRA / "docker" / "Dockerfile.gpu.dockerignore").read_text()
    for pattern in ("**/.venv", "**/.env", "**/auth_token", "**/*.pem"):
        assert pattern in ignore
    deps = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("deepspeed") for d in deps) and any(d.startswith("torch") for d in deps)
