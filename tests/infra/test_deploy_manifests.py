"""Every deployment manifest loads, and carries what the code relies on.

Image, entrypoint, resources, volumes, and the environment the code and its libraries
read; the pipeline config of the ConfigMap validates as a real ``PipelineConfig`` and
points at the MLflow Service that ``mlflow.yaml`` defines. (Whether a cluster accepts
them field by field is ``test_manifest_schemas.py``.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import ray
import yaml

from infra.config import validate
from pipelines.config import PipelineConfig
from tests.conftest import REPO

DEPLOY = REPO / "infra" / "deploy"
IMAGE = "registry.example.com/omni-dfm:0.1.0"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in documents(name)}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_manifest_loads() -> None:
    names = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")]
    assert len(names) >= 6
    for path in names:
        assert documents(str(path.relative_to(DEPLOY))), path


def pipeline() -> PipelineConfig:
    configmap = by_kind("pipeline-configmap.yaml")["ConfigMap"]
    return validate(PipelineConfig, yaml.safe_load(configmap["data"]["pipeline.yaml"]))


def test_the_cluster_pipeline_config_validates_and_uses_the_cluster() -> None:
    config = pipeline()
    assert config.workspace.startswith("s3://")
    assert all(i.uri.startswith("s3://") for i in config.corpus.inputs)
    assert config.ray.address == "auto"  # a job's driver joins its cluster
    assert config.submit.runtime_env.pip is None  # the image has the requirements
    service = by_kind("mlflow/mlflow.yaml")["Service"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert config.mlflow.tracking_uri == f"http://{host}:{service['spec']['ports'][0]['port']}"
    assert config.train.use_gpu


def test_raycluster_has_a_head_and_gpu_workers_with_shm_nccl_and_s3_credentials() -> None:
    cluster = by_kind("raycluster.yaml")["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__  # client and cluster Ray agree
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    [gpu_group] = cluster["spec"]["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]
    [head_container], [worker_container] = head["containers"], worker["containers"]
    assert head_container["image"] == worker_container["image"] == IMAGE
    assert 8265 in [p["containerPort"] for p in head_container["ports"]]  # the Jobs API
    gpus = int(worker_container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(gpu_group["rayStartParams"]["num-gpus"]) == 8
    workers = pipeline().train.num_workers
    assert workers <= gpus * gpu_group["maxReplicas"] and workers == gpus * gpu_group["replicas"]
    # the autoscaler never takes away the GPUs a training run is waiting on
    assert workers <= gpus * gpu_group["minReplicas"]
    for spec, container in ((head, head_container), (worker, worker_container)):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/etc/omni"]]["configMap"]["name"] == "omni-pipeline"
        env = env_of(container)
        for name in SECRET_ENV:  # from a Secret, never a literal
            assert "secretKeyRef" in env[name], name
        assert env["RAY_AUTH_MODE"] == "disabled" and env["HF_HUB_OFFLINE"] == "1"
    worker_env = env_of(worker_container)
    assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG"} <= set(worker_env)


def test_rayjob_runs_the_workflow_on_the_cluster() -> None:
    job = by_kind("rayjob.yaml")["RayJob"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == "omni"
    assert job["spec"]["entrypoint"] == "omni run --config /etc/omni/pipeline.yaml"
    comment = (DEPLOY / "rayjob.yaml").read_text().split("apiVersion")[0]
    assert "re-applying a finished one" in comment and "replace --force" in comment


def test_cluster_launcher_runs_the_image_and_keeps_the_dashboard_local() -> None:
    launcher = documents("cluster-launcher.yaml")[0]
    assert launcher["docker"]["image"] == IMAGE
    assert any("--shm-size" in option for option in launcher["docker"]["run_options"])
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-port=8265" in head_start
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types and types["head"]["resources"] == {"CPU": 0}


def test_mlflow_server_uses_postgres_and_s3_and_keeps_secrets_out_of_arguments() -> None:
    deployment = by_kind("mlflow/mlflow.yaml")["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert '--backend-store-uri "$POSTGRES_URI"' in command
    assert "--artifacts-destination s3://" in command and "--serve-artifacts" in command
    assert "secretKeyRef" in env_of(container)["POSTGRES_URI"]
    compose = documents("mlflow/docker-compose.yml")[0]["services"]
    assert {"postgres", "minio", "mlflow"} <= set(compose)
    for service in compose.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # published on loopback only
    assert "${POSTGRES_PASSWORD" in compose["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_the_sweep_cronjob_runs_omni_sweep_once_anywhere_the_cluster_has_room() -> None:
    """No GPU demanded (a cluster without one would leave it Pending forever), and the
    RayCluster's tolerations, so the GPU nodes' taint does not keep it off them."""
    cronjob = by_kind("cronjob-sweep.yaml")["CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "omni sweep" in command and "--once" in command
    assert container["image"].rsplit(":", 1)[0] == IMAGE.rsplit(":", 1)[0]
    resources = container["resources"]
    assert not any("gpu" in name for part in resources.values() for name in part)
    [gpu_group] = by_kind("raycluster.yaml")["RayCluster"]["spec"]["workerGroupSpecs"]
    assert pod["tolerations"] == gpu_group["template"]["spec"]["tolerations"]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(manifest, pod spec) of every pod template under ``infra/deploy``."""
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in documents(str(path.relative_to(DEPLOY))):
            yield from ((path.name, spec) for spec in _pod_specs(document))


def _pod_specs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from _pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pod_specs(value)


def test_every_pod_pulling_from_the_private_registry_has_the_pull_secret() -> None:
    found = 0
    for name, spec in pod_specs():
        images = [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]
        if any(image.startswith("registry.example.com/") for image in images):
            found += 1
            assert {"name": "omni-registry"} in spec.get("imagePullSecrets", []), name
    assert found >= 4  # RayCluster head and workers, CronJob, MLflow


def test_the_mlflow_database_is_deployed_where_its_uri_points() -> None:
    kinds = by_kind("mlflow/postgres.yaml")
    service, database = kinds["Service"], kinds["StatefulSet"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    walkthrough = (REPO / "infra" / "README.md").read_text()
    assert f"@{host}:{service['spec']['ports'][0]['port']}/mlflow" in walkthrough
    assert service["spec"]["selector"] == database["spec"]["template"]["metadata"]["labels"]
    [container] = database["spec"]["template"]["spec"]["containers"]
    assert "secretKeyRef" in env_of(container)["POSTGRES_PASSWORD"]
    assert database["spec"]["volumeClaimTemplates"]  # the runs outlive the pod


def test_the_readme_walks_from_an_empty_cluster_to_a_run_and_a_sweep() -> None:
    readme = (REPO / "infra" / "README.md").read_text()
    text = readme[readme.index("## Kubernetes (KubeRay)") : readme.index("## Ray cluster")]
    steps = [
        "nvidia-device-plugin",  # GPUs schedulable
        "kuberay/kuberay-operator",  # the CRDs' controller
        "secret docker-registry omni-registry",
        "aws s3 mb s3://omni-mlflow",
        "mlflow/postgres.yaml",
        "raycluster.yaml",
        "omni submit run",
        "cronjob-sweep.yaml",
    ]
    positions = {step: text.find(step) for step in steps}
    order = list(positions.values())
    assert -1 not in order and order == sorted(order), positions


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches it or one of its parent folders decides; ``!`` includes again."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not keep
    return ignored


def test_the_docker_build_context_holds_what_the_image_copies_and_no_venv() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = [source for line in copied for source in line.split()]
    assert {"pyproject.toml", "pipelines", "infra"} <= set(sources)
    for source in sources:
        assert not docker_ignored(f"{source}/x.py" if "." not in source else source, patterns)
    for heavy in (".venv/lib/torch/x.so", ".git/objects/ab", "work/tokens/a.tar",
                  "pipelines/__pycache__/cli.cpython-311.pyc", "tests/conftest.py"):  # fmt: skip
        assert docker_ignored(heavy, patterns), heavy


def test_the_image_installs_the_project_with_its_constraints() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "-c /tmp/constraints-gpu.txt -e ." in dockerfile
