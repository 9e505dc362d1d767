"""What the deploy/ tests share: the manifests under deploy/ loaded once, deploy/README.md's
commands one per line, and walkers over a manifest's nodes and pod templates."""

from __future__ import annotations

from collections.abc import Iterator

import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"
README = (DEPLOY / "README.md").read_text().replace("\\\n", " ")  # one command per line
K8S_VERSION = "1.30.0"


def load(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


def _manifests() -> dict[str, dict]:
    """Every Kubernetes object under deploy/ (a YAML document with a `kind`), by file."""
    found = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and "kind" in d]
        assert len(docs) <= 1, f"{path}: one object per file"
        if docs:
            found[path.relative_to(DEPLOY).as_posix()] = docs[0]
    return found


MANIFESTS = _manifests()
KUBERAY = sorted(rel for rel, obj in MANIFESTS.items() if obj["apiVersion"].startswith("ray.io/"))
PLAIN = sorted(set(MANIFESTS) - set(KUBERAY))


def nodes(node, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(path, value) of `node` and of everything inside it."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from nodes(value, (*path, key))


def dotted(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(root)"


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, PodTemplateSpec) of every pod template in a manifest."""
    for path, node in nodes(obj):
        if isinstance(node, dict) and isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield dotted(path), node


def kubernetes_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod(template: dict) -> dict:
    metadata = {"name": "pod", **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", **template, "metadata": metadata}
