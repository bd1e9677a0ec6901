"""Reads a job's transfer set straight from its S3 bucket, as a user would
from Python (boto3 + safetensors + numpy, nothing of ours):

    python bench/check_s3_transfer.py BUCKET JOB_PREFIX [ENDPOINT]

JOB_PREFIX is `<prefix>/<job>` of the job's `[storage]`; credentials come
from the AWS_* variables. Starts from the manifest's fixed key
`<JOB_PREFIX>/transfer/manifest.json`, fetches every shard it lists (by
its `key`, the worker attempt that was committed; `transfer/<file>` when a
manifest has no key), checks
its sha256 and its rows against the manifest, and that every soft target
at T = 1 (softmax of the stored logits) is a distribution. Exits non-zero
on any mismatch."""

import hashlib
import json
import sys

import boto3
import numpy as np
from safetensors.numpy import load


def main():
    bucket, prefix = sys.argv[1], sys.argv[2].strip("/")
    endpoint = sys.argv[3] if len(sys.argv) > 3 else None
    s3 = boto3.client("s3", endpoint_url=endpoint)
    get = lambda key: s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    manifest = json.loads(get("transfer/manifest.json"))
    assert manifest["format_version"] == 2 and manifest["encoding"] == "dense-f32", manifest
    classes, teachers = manifest["num_classes"], manifest["teachers"]
    rows = 0
    for entry in manifest["shards"]:
        data = get(entry.get("key") or f"transfer/{entry['file']}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        tensors = load(data)
        index = tensors["example_index"]
        assert list(index) == list(range(entry["start"], entry["end"])), entry["file"]
        for t in teachers:
            z = tensors[f"logits.{t}"].astype(np.float64)
            assert z.shape == (entry["rows"], classes), (entry["file"], t, z.shape)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            assert np.allclose(p.sum(axis=1), 1.0) and np.isfinite(z).all(), (entry["file"], t)
        rows += entry["rows"]
    assert rows == manifest["num_examples"], (rows, manifest["num_examples"])
    print(f"s3://{bucket}/{prefix}/transfer: {len(manifest['shards'])} shards, "
          f"{rows} rows x {classes} classes for {len(teachers)} teachers, checksums ok")


if __name__ == "__main__":
    main()
