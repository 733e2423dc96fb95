"""A small renderer of this repository's kustomizations, for machines without `kubectl`.

It implements exactly the kustomize features `infra/k8s/` uses — `resources` (files and directories),
`namespace`, `labels` (metadata only), `patches` (JSON 6902 through `jsonpatch`, inline or from a file, with a
kind/name target) and `configMapGenerator` (files, labels, namespace, no name suffix) — and refuses any other key,
so a kustomization that grows past it fails loudly instead of rendering differently. Where `kubectl` is present the
tests check that both give the same objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "configMapGenerator"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
    "PriorityClass",
    "PersistentVolume",
}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects of one kustomization directory, in the order kustomize applies its fields."""
    directory = Path(directory)
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which this renderer does not do")
    objects = resources(directory, kust.get("resources", []))
    objects += [config_map(directory, gen) for gen in kust.get("configMapGenerator", [])]
    for patch in kust.get("patches", []):
        objects = patched(directory, objects, patch)
    for group in kust.get("labels", []):
        add_labels(objects, group)
    if ns := kust.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = ns
    return objects


def resources(directory: Path, entries: list[str]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for entry in entries:
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    return objects


def config_map(directory: Path, gen: dict) -> dict[str, Any]:
    options = gen.get("options", {})
    if not options.get("disableNameSuffixHash"):
        raise ValueError("configMapGenerator without disableNameSuffixHash is not supported")
    data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
    meta: dict[str, Any] = {"name": gen["name"]}
    if gen.get("namespace"):
        meta["namespace"] = gen["namespace"]
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def patched(directory: Path, objects: list[dict[str, Any]], patch: dict) -> list[dict[str, Any]]:
    ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
    if not isinstance(ops, list):
        raise ValueError("only JSON 6902 patches (a list of operations) are supported")
    target = patch["target"]
    matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
    if not matched:
        raise ValueError(f"patch target {target} matches nothing")
    # RFC 6902, as kustomize applies it
    return [jsonpatch.apply_patch(o, ops) if any(o is m for m in matched) else o for o in objects]


def add_labels(objects: list[dict[str, Any]], group: dict) -> None:
    if group.get("includeSelectors") or group.get("includeTemplates"):
        raise ValueError("labels with includeSelectors/includeTemplates are not supported")
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])


def canonical(objects: list[dict]) -> dict[tuple[str, str, str], str]:
    """Objects keyed by (kind, namespace, name), as sorted JSON: for comparing two renderings."""
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): json.dumps(o, sort_keys=True)
        for o in objects
    }
