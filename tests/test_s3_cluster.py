"""A Ray cluster with no shared filesystem at all, merging from a bucket into a bucket (the KubeRay
case of ``cluster_configs/kuberay-s3.yaml``): several Ray nodes on one machine
(``ray.cluster_utils.Cluster``, head without CPUs), each worker node with a cache of its own and
the driver's folders hidden from its shared-storage probe (``DISTMERGE_PROBE_UNSHARED``). The probe
passes (nothing local must be shared), each node that merges LoRA tensors fetches the LoRA itself by
URL (none reads the driver's copy), and the merged model in the bucket is the single-machine merge's bytes."""

from __future__ import annotations

import os

import pytest
import ray
from ray.cluster_utils import Cluster

import distmerge
from distmerge.app.synth import write_lora

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.ray


def test_a_cluster_without_shared_storage_merges_bucket_to_bucket(s3, s3_env, tiny_base, tiny_factors, tmp_path):
    bucket = s3.make_bucket()
    lora = str(tmp_path / "lora.safetensors")
    write_lora(lora, tiny_factors, layout="diffusion_model", alpha=4.0)
    s3.upload_folder(tiny_base, f"s3://{bucket}/base")
    s3.upload_file(lora, f"s3://{bucket}/lora.safetensors")
    distmerge.merge(tiny_base, [lora], str(tmp_path / "local"), max_shard_size="150KB", num_cpus=1)
    if ray.is_initialized():
        ray.shutdown()
    caches: dict[str, str] = {}  # node id -> that node's cache
    hidden = os.pathsep.join([str(tmp_path), os.environ["DISTMERGE_CACHE_DIR"]])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20})
    try:
        for i in range(2):
            cache = str(tmp_path / f"node{i}-cache")
            env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": cache, "DISTMERGE_PROBE_UNSHARED": hidden}
            caches[cluster.add_node(num_cpus=1, object_store_memory=80 << 20, env_vars=env).node_id] = cache
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        report = distmerge.merge(
            f"s3://{bucket}/base", [f"s3://{bucket}/lora.safetensors"], f"s3://{bucket}/out", max_shard_size="150KB"
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert {u.node_id for u in report.units} == set(caches)  # both nodes merged
    readers = {u.node_id for u in report.units if u.tensors_merged}  # a unit of head/embedders reads no LoRA
    assert readers
    fetched = {n: any("lora.safetensors" in fs for _, _, fs in os.walk(caches[n])) for n in readers}
    assert all(fetched.values()), fetched
    c = s3.client()
    for name in sorted(os.listdir(tmp_path / "local")):
        if name.endswith(".safetensors"):
            got = c.get_object(Bucket=bucket, Key=f"out/{name}")["Body"].read()
            assert got == open(os.path.join(tmp_path / "local", name), "rb").read(), name
    assert not s3.open_uploads(bucket)
