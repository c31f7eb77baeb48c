"""The example cluster configs in cluster_configs/: `ray up` YAMLs valid against Ray's own
autoscaler schema, the KubeRay RayJob wired for distmerge, and the example job file loadable."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
import yaml

from distmerge.app.jobfile import load_job

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs")
RAY_UP = ["ray-cluster-gpu.yaml", "single-node.yaml"]


def _load(name: str):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_yaml_matches_ray_schema(name, ray_schema):
    cfg = _load(name)
    jsonschema.validate(cfg, ray_schema)  # raises ValidationError on any schema violation
    assert cfg["cluster_name"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("pip install" in c and "distmerge" in c for c in cfg["setup_commands"])
    shm = [o for o in cfg["docker"]["run_options"] if o.startswith("--shm-size=")]
    assert shm and shm[0].split("=", 1)[1][:-1].isdigit()
    # the shared folder is visible at /mnt/shared inside the container on every node
    assert any(o.endswith(":/mnt/shared") for o in cfg["docker"]["run_options"])


def test_schema_check_is_not_vacuous(ray_schema):
    cfg = _load("ray-cluster-gpu.yaml")
    cfg["docker"]["run_option"] = cfg["docker"].pop("run_options")  # a typo Ray would reject
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)
    cfg = _load("ray-cluster-gpu.yaml")
    cfg["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


def test_gpu_cluster_node_types_and_shared_mount():
    cfg = _load("ray-cluster-gpu.yaml")
    assert cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 8 and t["resources"]["CPU"] > 0 for t in workers)
    assert all(t.get("min_workers", 0) <= t.get("max_workers", 0) <= cfg["max_workers"] for t in workers)
    cmds = cfg["initialization_commands"] + cfg["setup_commands"]
    assert any("mount -t" in c and c.rstrip().endswith(" /mnt/shared") for c in cmds), cmds
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_single_node_is_local_provider_without_workers():
    cfg = _load("single-node.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"] == []
    assert cfg["max_workers"] == 0


def _all_docs():
    with open(os.path.join(ROOT, "kuberay-rayjob.yaml"), encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for extra in ("kuberay-pvc.yaml",):  # the PVC may also live in its own file
        if os.path.exists(os.path.join(ROOT, extra)):
            with open(os.path.join(ROOT, extra), encoding="utf-8") as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _volumes(template: dict) -> dict[str, dict]:
    return {v["name"]: v for v in template["spec"].get("volumes", [])}


def test_rayjob_runs_distmerge_on_a_shared_rwx_volume():
    docs = _all_docs()
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "distmerge run" in spec["entrypoint"] and "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    groups = cluster["workerGroupSpecs"]
    assert groups

    pvcs = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    job_file = spec["entrypoint"].split()[2]

    def shared_mount(template: dict) -> str:
        claims = {
            n: v["persistentVolumeClaim"]["claimName"]
            for n, v in _volumes(template).items()
            if "persistentVolumeClaim" in v
        }
        assert claims, "no persistentVolumeClaim volume"
        for name, claim in claims.items():
            assert claim in pvcs, f"PVC {claim} is not defined"
            assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]
        paths = {
            m["mountPath"] for c in _containers(template) for m in c.get("volumeMounts", []) if m["name"] in claims
        }
        assert len(paths) == 1, paths
        return paths.pop()

    def has_dshm(template: dict) -> bool:
        vols = _volumes(template)
        return any(
            m["mountPath"] == "/dev/shm" and vols[m["name"]].get("emptyDir", {}).get("medium") == "Memory"
            for c in _containers(template)
            for m in c.get("volumeMounts", [])
        )

    head_path = shared_mount(head)
    assert job_file.startswith(head_path + "/")  # the job file is on the shared volume
    assert has_dshm(head)
    for g in groups:
        t = g["template"]
        assert shared_mount(t) == head_path  # same path everywhere
        assert has_dshm(t)
        limits = [c["resources"]["limits"] for c in _containers(t)]
        assert any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)
    assert cluster["rayVersion"] and all(c["image"] for c in _containers(head))


def test_example_job_file_loads():
    job = load_job(os.path.join(ROOT, "jobs", "wan22-experts.yaml"))
    assert [m.name for m in job.merges] == ["high_noise_model", "low_noise_model"]
    for m in job.merges:
        assert m.base.startswith("/mnt/shared/") and m.output.startswith("/mnt/shared/")
        assert all(lo.path.startswith("/mnt/shared/") for lo in m.loras)
        assert m.name in m.base and m.name in m.output
        assert m.dtype == "bf16"  # from defaults
    assert len({m.output for m in job.merges}) == 2


def test_s3_rayjob_merges_bucket_to_bucket_with_no_shared_volume():
    """``kuberay-s3.yaml``: the entrypoint is a merge the CLI parses, from and to ``s3://``, joining
    the RayJob's cluster; no pod mounts a persistent volume (only pod-local emptyDirs); every pod has
    the credentials from the Secret and the same store settings, and a scratch folder of its own."""
    from distmerge.app.flags import build_parser

    with open(os.path.join(ROOT, "kuberay-s3.yaml"), encoding="utf-8") as f:
        (job,) = [d for d in yaml.safe_load_all(f) if d]
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "distmerge"
    args = build_parser().parse_args(argv[1:])
    assert args.address == "auto"
    assert all(p.startswith("s3://") for p in [args.base, *args.lora, args.output])
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert len(templates) >= 2
    for t in templates:
        assert all(set(v) == {"name", "emptyDir"} for v in _volumes(t).values()), _volumes(t)
        for c in _containers(t):
            env = {e["name"]: e for e in c["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert env["DISTMERGE_SCRATCH_DIR"]["value"] in mounts
