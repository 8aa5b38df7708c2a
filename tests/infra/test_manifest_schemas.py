"""Every deployment manifest passes what a cluster checks it with, field by field.

Kubernetes kinds against the Kubernetes 1.36 object schemas, RayCluster and RayJob
against the KubeRay v1.7.0 CRDs and the operator's own admission rules, all strict about
unknown fields (``tests/infra/manifest_schemas.py``, ``kuberay_admission.py``); the
cluster launcher's YAML through Ray's ``prepare_config`` + ``validate_config``, as
``ray up`` does. Each check is also shown to refuse a broken manifest, so a pass means
something.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.infra.kuberay_admission import admission_errors
from tests.infra.manifest_schemas import errors

DEPLOY = REPO / "infra" / "deploy"
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p != LAUNCHER)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_for_the_cluster(path: Path) -> None:
    for document in documents(path):
        where = f"{path.name} {document.get('kind')}"
        assert errors(document) == [], where
        assert admission_errors(document) == [], where


def first(path: str) -> dict[str, Any]:
    return documents(DEPLOY / path)[0]


def test_the_schemas_refuse_unknown_and_invalid_fields() -> None:
    cluster = first("raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 2
    assert any("minReplica" in e for e in errors(typo))
    nested = copy.deepcopy(cluster)  # inside the embedded Kubernetes pod template
    nested["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in errors(nested))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("'two' is not of type 'integer'" in e for e in errors(wrong))

    cronjob = first("cronjob-sweep.yaml")
    broken = copy.deepcopy(cronjob)
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["tolerations"][0]["efect"] = "x"
    assert any("efect" in e for e in errors(broken))
    meta = copy.deepcopy(cronjob)
    meta["metadata"]["label"] = {"a": "b"}
    assert any("label" in e for e in errors(meta))
    deployment = first("mlflow/mlflow.yaml")
    deployment["spec"]["replicas"] = "1"
    assert any("'1' is not of type 'integer'" in e for e in errors(deployment))
    job = first("rayjob.yaml")
    job["metadata"]["namespace"] = 7
    assert errors(job) != []
    unknown = {"apiVersion": "v9", "kind": "Gadget"}
    assert errors(unknown) == ["no schema for apiVersion 'v9' kind 'Gadget'"]


def test_the_operator_refuses_a_ttl_without_shutdown_and_bad_worker_bounds() -> None:
    """KubeRay >= 1.4 accepts these in its schema but refuses them when it reconciles."""
    job = first("rayjob.yaml")
    job["spec"]["ttlSecondsAfterFinished"] = 86400  # what rayjob.yaml had
    assert errors(job) == []
    assert admission_errors(job) == ["ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"]
    job["spec"]["backoffLimit"] = 2
    assert "backoffLimit is incompatible with clusterSelector" in admission_errors(job)
    cluster = first("raycluster.yaml")
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 5, 4
    assert admission_errors(cluster) == ["worker group gpu: minReplicas 5 > maxReplicas 4"]
    cluster["metadata"]["name"] = "Omni_Cluster"
    assert any("DNS-1035" in e for e in admission_errors(cluster))


def launcher_errors(config: dict[str, Any]) -> str | None:
    """What ``ray up`` says of a launcher config before it starts anything; None if fine."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # jsonschema.ValidationError, ValueError
        return str(error).splitlines()[0]
    return None


def test_the_cluster_launcher_config_passes_rays_validation() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert launcher_errors(config) is None
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu"]["min_wrkers"] = 1
    assert "'min_wrkers' was unexpected" in launcher_errors(typo)
    wrong = copy.deepcopy(config)
    wrong["max_workers"] = "four"
    assert "is not of type 'integer'" in launcher_errors(wrong)
