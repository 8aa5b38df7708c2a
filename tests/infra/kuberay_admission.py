"""The KubeRay operator's own checks of a RayCluster or RayJob, beyond its CRD schema.

The operator refuses (a failed reconcile and an event, the object stays inert) specs that
the CRD schema accepts. The rules below are those of
``ray-operator/controllers/ray/utils/validation.go`` at kuberay v1.7.0
(``ValidateRayClusterSpec``, ``ValidateRayClusterMetadata``, ``ValidateRayJobSpec``,
``validateDeletionConfiguration``) that a manifest can break; the feature-gated and
status-only ones are left out.
"""

from __future__ import annotations

import re
from typing import Any

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_CLUSTER_NAME = 63
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def _group(name: str, group: dict[str, Any]) -> list[str]:
    errors = []
    params = group.get("rayStartParams", {})
    if group.get("resources") and any(params.get(key) for key in RAY_START_RESOURCES):
        errors.append(f"{name}: resources set in both rayStartParams and resources")
    if "labels" in params:
        errors.append(f"{name}: rayStartParams['labels'] is not supported")
    if not group.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{name}: the pod template has no container")
    return errors


def raycluster_errors(spec: dict[str, Any], name: str | None = None) -> list[str]:
    """What ``ValidateRayClusterSpec`` (and, given ``name``, the metadata check) refuses."""
    errors = []
    if name is not None and (len(name) > MAX_CLUSTER_NAME or not DNS1035.match(name)):
        errors.append(f"RayCluster name {name!r} is not a DNS-1035 label of <= 63 characters")
    errors += _group("head", spec.get("headGroupSpec", {}))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for group in spec.get("workerGroupSpecs", []):
        label = f"worker group {group.get('groupName')}"
        errors += _group(label, group)
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"{label}: minReplicas and maxReplicas are required without autoscaling")
        if (low is not None and low < 0) or (high is not None and high < 0):
            errors.append(f"{label}: negative minReplicas or maxReplicas")
        if low is not None and high is not None and low > high:
            errors.append(f"{label}: minReplicas {low} > maxReplicas {high}")
        if autoscaling and group.get("suspend"):
            errors.append(f"{label}: cannot be suspended with the autoscaler enabled")
    return errors


def rayjob_errors(spec: dict[str, Any]) -> list[str]:
    """What ``ValidateRayJobSpec`` refuses."""
    errors = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    selector = spec.get("clusterSelector") or {}
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes: true")
    if ttl < 0:
        errors.append("ttlSecondsAfterFinished must be non-negative")
    if ttl > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if not selector and spec.get("rayClusterSpec") is None:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector needs a non-empty ray.io/cluster")
        if spec.get("submissionMode") == "SidecarMode":
            errors.append("clusterSelector is not supported in SidecarMode")
        if spec.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit is incompatible with clusterSelector")
        if spec.get("suspend"):
            errors.append("clusterSelector does not support suspend")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{field} must be positive")
    if spec.get("rayClusterSpec") is not None:
        errors += raycluster_errors(spec["rayClusterSpec"])
    return errors


def admission_errors(document: dict[str, Any]) -> list[str]:
    """The operator's refusals of a RayCluster or RayJob manifest; [] for other kinds."""
    kind, spec = document.get("kind"), document.get("spec", {})
    if kind == "RayCluster":
        return raycluster_errors(spec, document.get("metadata", {}).get("name"))
    if kind == "RayJob":
        return rayjob_errors(spec)
    return []
