"""The schemas a Kubernetes cluster checks our manifests with, kept as test data.

* ``schemas/kuberay-v1.7.0/``: the KubeRay ``RayCluster`` and ``RayJob`` CRDs, verbatim
  (gzipped) from ray-project/kuberay at tag v1.7.0 (see ``schemas/SOURCES.md``);
* ``schemas/kubernetes-1.36/definitions.json.gz``: the Kubernetes 1.36 object schemas
  (every definition reachable from Deployment, StatefulSet, CronJob, Job, Service,
  ConfigMap, Namespace, Secret and ObjectMeta), unedited, from kubernetes-client/python
  v36.0.3's ``swagger.json.unprocessed``.

Validation is strict as ``kubectl apply`` (server-side field validation ``Strict``, the
default since Kubernetes 1.27) is: an unknown field is an error, except where a schema
says ``x-kubernetes-preserve-unknown-fields``. Two representation rules of the API
machinery that the JSON schemas leave out are applied as the API server does: an
IntOrString holds an int or a string, a Quantity a string or a number.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
KUBERAY = SCHEMAS / "kuberay-v1.7.0"
KUBERNETES = SCHEMAS / "kubernetes-1.36" / "definitions.json.gz"
CRDS = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    properties and does not preserve unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def kubernetes_definitions() -> dict[str, Any]:
    definitions = json.loads(gzip.decompress(KUBERNETES.read_bytes()))["definitions"]
    definitions = strict(definitions)
    definitions[INT_OR_STRING] = {"type": ["integer", "string"]}
    definitions[QUANTITY] = {"type": ["string", "number"]}
    return definitions


@functools.cache
def kinds() -> dict[tuple[str, str], str]:
    """(apiVersion, kind) -> definition name, from ``x-kubernetes-group-version-kind``."""
    out = {}
    for name, definition in kubernetes_definitions().items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            out[api, gvk["kind"]] = name
    return out


def kubernetes_validator(definition: str) -> jsonschema.Draft4Validator:
    schema = {"definitions": kubernetes_definitions(), "$ref": f"#/definitions/{definition}"}
    return jsonschema.Draft4Validator(schema)


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of the CRD's served version ``api_version``."""
    text = gzip.decompress((KUBERAY / f"{CRDS[api_version, kind]}.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB of YAML
    version = api_version.split("/", 1)[1]
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return strict(served["schema"]["openAPIV3Schema"])


def errors(document: dict[str, Any]) -> list[str]:
    """Every schema error of one manifest, as ``path: message``; [] when it is valid."""
    key = (document.get("apiVersion"), document.get("kind"))
    found: list[jsonschema.ValidationError] = []
    if key in CRDS:
        found += jsonschema.Draft7Validator(crd_schema(*key)).iter_errors(document)
        meta = kubernetes_validator(OBJECT_META)
        found += meta.iter_errors(document.get("metadata", {}))
    elif key in kinds():
        found += kubernetes_validator(kinds()[key]).iter_errors(document)
    else:
        return [f"no schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in found]
