"""Turn ``k8s/*.yaml`` into YAML that ``podman kube play`` runs on one machine (deploy-smoke.sh).

The containers, images, commands, environment, mounts and container security settings are the
manifests' own; only what a single-node podman cannot do, or what must not happen on a shared CI
machine, changes:

* Kinds podman does not play (Namespace, Service, NetworkPolicy) are dropped; the aggregator
  Deployment stays a Deployment, and each site's Deployment becomes a Pod with
  ``restartPolicy: Never`` so the script can read the agent's exit status. The aggregator's init
  container runs as a Pod of its own, played and waited for first (podman 4.3 races with itself
  over init containers).
* Networking: every pod shares the host's network (``hostNetwork``) and the aggregator listens
  on 127.0.0.1 ports picked by the caller, so no traffic leaves the loopback interface (the
  podman bridge's private addresses are not used).
* Storage: PersistentVolumeClaims and Secrets become ``hostPath`` folders the caller prepared
  (owned by uid 10001); podman plays neither Secret volumes nor ``fsGroup``.
* Pod-level ``securityContext`` (runAsUser, runAsGroup) is copied into each container, where
  podman reads it. Scheduling fields (nodeSelector, tolerations), GPU limits and probes are
  dropped: there is one node, no GPU, and podman plays only exec/http/tcp liveness probes (the
  script checks the gRPC health service itself).
* The federation is the tiny one of tests/experiments/test_federation.py (1 round, 2 sites, 32^3) and the
  agents run on the CPU with ``FEDSEG_DEVICE=cpu``.

Usage (from the repository root, with the project's venv)::

    python scripts/podman_variant.py --workdir W --grpc-port P --metrics-port M --health-port H \\
        --site site-1=DATA1 --site site-2=DATA2 --init-out W/init.yaml > W/play.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parent.parent
INIT_ROLE = "fedsegnet.io/podman-init"

TINY_FEDERATION = """\
# The tiny federation of tests/experiments/test_federation.py: one round, two sites, 32^3 volumes.
[federation]
id = "smoke"
rounds = 1
min_clients = 2
max_clients = 2
round_timeout_s = 600
sites = [{sites}]

[aggregation]
strategy = "fedavg"

[training]
local_epochs = 1
learning_rate = 1e-3
batch_size = 2
seed = 3

[model]
architecture = "transformer_unet"
in_channels = 1
out_channels = 4
img_size = [32, 32, 32]

[model.options]
channels = [8, 16, 32]
num_transformer_layers = 1
num_heads = 2
"""

Doc = dict[str, Any]


def load_manifests(k8s_dir: Path) -> list[Doc]:
    """Every YAML document of ``k8s_dir/*.yaml`` in file-name order (the apply order)."""
    docs: list[Doc] = []
    for path in sorted(k8s_dir.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _component(doc: Doc) -> str | None:
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def _set_env(container: Doc, values: dict[str, str]) -> None:
    env = [e for e in container.get("env", []) if e["name"] not in values]
    env.extend({"name": k, "value": v} for k, v in values.items())
    container["env"] = env


def _host_path(path: Path, kind: str = "Directory") -> Doc:
    return {"hostPath": {"path": str(path), "type": kind}}


def _podman_pod_spec(spec: Doc, volumes: dict[str, Doc]) -> Doc:
    """A pod spec podman plays: host network, container-level user, hostPath volumes."""
    spec = copy.deepcopy(spec)
    pod_security = spec.pop("securityContext", {})
    for key in ("nodeSelector", "tolerations", "automountServiceAccountToken", "enableServiceLinks"):
        spec.pop(key, None)
    spec["hostNetwork"] = True
    for container in spec.get("initContainers", []) + spec["containers"]:
        security = container.setdefault("securityContext", {})
        for key in ("runAsUser", "runAsGroup", "runAsNonRoot"):
            if key in pod_security:
                security.setdefault(key, pod_security[key])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            container.pop(probe, None)
        limits = container.get("resources", {}).get("limits", {})
        limits.pop("nvidia.com/gpu", None)
        # The host network has no container ports to map.
        container.pop("ports", None)
    replaced = []
    for volume in spec.get("volumes", []):
        name = volume["name"]
        replaced.append({"name": name, **volumes[name]} if name in volumes else volume)
    spec["volumes"] = replaced
    return spec


def _private_empty_dirs(spec: Doc, prefix: str) -> None:
    """Podman 4.3 names an emptyDir's volume after the volume alone, so pods with an emptyDir
    called ``tmp`` would share one; prefix each with its pod's name to keep them apart."""
    renames = {v["name"]: f"{prefix}-{v['name']}" for v in spec["volumes"] if "emptyDir" in v}
    for volume in spec["volumes"]:
        volume["name"] = renames.get(volume["name"], volume["name"])
    for container in spec.get("initContainers", []) + spec["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renames.get(mount["name"], mount["name"])


def podman_variant(
    docs: Iterable[Doc],
    *,
    workdir: Path,
    grpc_port: int,
    metrics_port: int,
    health_port: int,
    sites: dict[str, Path],
) -> list[Doc]:
    """The documents to play, given the caller's prepared folders under ``workdir``:

    ``store/`` (the aggregator's volume), ``tls/aggregator/``, ``tls/SITE/`` (tls.crt, tls.key,
    ca.crt), ``revoked/revoked.txt``, ``state/SITE/``, all owned by uid 10001; ``sites`` maps
    each site name to its NIfTI folder.
    """
    docs = list(docs)
    out: list[Doc] = []
    site_template = next(
        d for d in docs if d["kind"] == "Deployment" and _component(d) == "site-agent"
    )
    for doc in docs:
        kind = doc["kind"]
        if kind == "ConfigMap" and doc["metadata"]["name"] == "fedsegnet-federation":
            doc = copy.deepcopy(doc)
            names = ", ".join(f'"{s}"' for s in sites)
            doc["data"] = {"federation.toml": TINY_FEDERATION.format(sites=names)}
            out.append(doc)
        elif kind == "Deployment" and _component(doc) == "aggregator":
            doc = copy.deepcopy(doc)
            volumes = {
                "store": _host_path(workdir / "store"),
                "tls": _host_path(workdir / "tls" / "aggregator"),
                "revoked": _host_path(workdir / "revoked"),
            }
            spec = _podman_pod_spec(doc["spec"]["template"]["spec"], volumes)
            for container in spec["containers"]:
                _set_env(container, {
                    "FEDSEG_LISTEN": f"127.0.0.1:{grpc_port}",
                    "FEDSEG_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
                    "FEDSEG_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
                })
            _private_empty_dirs(spec, doc["metadata"]["name"])
            # Podman 4.3 removes an init container right after it exits and races with its own
            # cleanup of it ("cannot remove container ... as it is running"), leaving the pod
            # half started. So each init container runs as a Pod of its own, played and waited
            # for before the rest: the same order Kubernetes keeps.
            for init in spec.pop("initContainers", []):
                out.append(_init_pod(doc, spec, init))
            doc["spec"]["template"]["spec"] = spec
            out.append(doc)
    for site, data in sites.items():
        out.append(_site_pod(site_template, site, data, workdir, grpc_port))
    # The revocation ConfigMap is the operator's (not in k8s/); here it is a hostPath folder.
    return out


def _init_pod(deployment: Doc, spec: Doc, init: Doc) -> Doc:
    """An init container of ``deployment`` as a run-once Pod with the volumes it mounts."""
    init = copy.deepcopy(init)
    mounted = {m["name"] for m in init.get("volumeMounts", [])}
    volumes = [copy.deepcopy(v) for v in spec["volumes"] if v["name"] in mounted]
    # Its own emptyDirs, not the main pod's (podman names their volumes by name alone).
    for volume in volumes:
        if "emptyDir" in volume:
            for mount in init["volumeMounts"]:
                if mount["name"] == volume["name"]:
                    mount["name"] += "-init"
            volume["name"] += "-init"
    name = f"{deployment['metadata']['name']}-{init['name']}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {INIT_ROLE: "true"}},
        "spec": {
            "hostNetwork": True,
            "restartPolicy": "Never",
            "containers": [init],
            "volumes": volumes,
        },
    }


def split_init_pods(docs: list[Doc]) -> tuple[list[Doc], list[Doc]]:
    """``docs`` as (what to play first and wait for, the rest); ConfigMaps go with both."""
    config_maps = [d for d in docs if d["kind"] == "ConfigMap"]
    first = [d for d in docs if d["metadata"].get("labels", {}).get(INIT_ROLE) == "true"]
    rest = [d for d in docs if d not in first and d not in config_maps]
    return config_maps + first if first else [], config_maps + rest


def _site_pod(template: Doc, site: str, data: Path, workdir: Path, grpc_port: int) -> Doc:
    labels = dict(template["spec"]["template"]["metadata"]["labels"], **{"fedsegnet.io/site": site})
    volumes = {
        "nifti": _host_path(data),
        "state": _host_path(workdir / "state" / site),
        "tls": _host_path(workdir / "tls" / site),
    }
    spec = _podman_pod_spec(template["spec"]["template"]["spec"], volumes)
    spec["restartPolicy"] = "Never"
    # No memory-backed /dev/shm is needed with FEDSEG_NUM_WORKERS=0.
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "dshm"]
    for container in spec["containers"]:
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "dshm"]
        _set_env(container, {
            "FEDSEG_SITE": site,
            "FEDSEG_AGGREGATOR": f"127.0.0.1:{grpc_port}",
            "FEDSEG_DEVICE": "cpu",
            "FEDSEG_NUM_WORKERS": "0",
            "FEDSEG_AUGMENT": "no",
            "FEDSEG_VAL_FRACTION": "0.5",
        })
        container["resources"] = {"limits": {"memory": "4Gi"}}
    _private_empty_dirs(spec, f"fedsegnet-{site}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"fedsegnet-{site}", "labels": labels},
        "spec": spec,
    }


def volume_names(docs: Iterable[Doc]) -> list[str]:
    """The podman volumes playing ``docs`` creates: one per emptyDir and per ConfigMap mounted."""
    names: list[str] = []
    for doc in docs:
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc.get("spec", {})
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                names.append(volume["name"])
            elif "configMap" in volume:
                names.append(volume["configMap"]["name"])
    return sorted(set(names))


def _literal_blocks(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """Multi-line strings (the TOML file, the init container's script) as readable ``|`` blocks."""
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k8s", type=Path, default=REPO / "k8s", help="the manifests (default: k8s/)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--health-port", type=int, required=True)
    p.add_argument("--site", action="append", required=True, metavar="NAME=DATA_DIR",
                   help="a site and its NIfTI folder (repeat for each site)")
    p.add_argument("--init-out", type=Path, required=True,
                   help="write the init containers' Pods here (play and wait for them first)")
    p.add_argument("--volumes-out", type=Path,
                   help="write the names of the podman volumes the play creates here, one a line")
    args = p.parse_args(argv)
    sites = {}
    for item in args.site:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            p.error(f"--site expects NAME=DATA_DIR, got {item!r}")
        sites[name] = Path(folder).resolve()
    docs = podman_variant(
        load_manifests(args.k8s), workdir=args.workdir.resolve(), grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, health_port=args.health_port, sites=sites,
    )
    if args.volumes_out:
        args.volumes_out.write_text("".join(f"{name}\n" for name in volume_names(docs)))
    yaml.SafeDumper.add_representer(str, _literal_blocks)
    first, rest = split_init_pods(docs)
    args.init_out.write_text(yaml.safe_dump_all(first, sort_keys=False))
    yaml.safe_dump_all(rest, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
