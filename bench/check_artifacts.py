#!/usr/bin/env python3
"""Reads our artifacts with nothing but numpy + safetensors, as a user would.

Given the output folder of `mnist_paper` (report.json, *.safetensors models,
transfer-<fingerprint>/) or of a cluster job (report.json, models/,
transfer/, dataset/ with the splits in shards and their index.json), it
  * loads each model file, checks its metadata, runs its forward pass in
    numpy on the MNIST test set and compares the error count with the one
    in report.json (they must agree exactly, up to float ties);
  * verifies every transfer-set shard's sha256 against manifest.json and
    checks tensor names, dtypes, shapes and example ranges.

usage: python3 bench/check_artifacts.py OUT_DIR [MNIST_DIR]
(MNIST_DIR is only read for `mnist_paper` folders.)
"""
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def read_idx(path):
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    ndims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


def load_model(path):
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    # distill-model/2 tags the architecture with its family; distill-mlp/1
    # (the first format) held a bare MLP spec.
    assert meta["format"] in ("distill-model/2", "distill-mlp/1"), meta
    arch = json.loads(meta["architecture"])
    assert arch.pop("family", "mlp") == "mlp", arch
    assert meta["activation"] == "relu"
    tensors = load_file(str(path))
    layers = []
    sizes = [arch["input_dim"], *arch["hidden"], arch["num_classes"]]
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        w, b = tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]
        assert w.shape == (fan_out, fan_in) and b.shape == (fan_out,), (w.shape, b.shape)
        layers.append((w.astype(np.float64), b.astype(np.float64)))
    return layers, json.loads(meta["input_normalization"])


def forward(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def check_transfer_set(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    # Version 1 says "dtype": "F32"; version 2 names its encoding instead.
    version = manifest["format_version"]
    if version == 1:
        assert manifest["dtype"] == "F32" and "encoding" not in manifest
    else:
        assert version == 2 and "dtype" not in manifest, manifest
        assert manifest["encoding"] == "dense-f32", f"unknown encoding {manifest['encoding']}"
    rows = 0
    for shard in manifest["shards"]:
        data = (folder / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"], shard["file"]
        tensors = load_file(str(folder / shard["file"]))
        idx = tensors["example_index"]
        assert idx.dtype == np.int64 and list(idx) == list(range(shard["start"], shard["end"]))
        for t in manifest["teachers"]:
            logits = tensors[f"logits.{t}"]
            assert logits.dtype == np.float32 and logits.shape == (shard["rows"], manifest["num_classes"])
            assert np.isfinite(logits).all()
        rows += shard["rows"]
    assert rows == manifest["num_examples"]
    return len(manifest["shards"]), rows


def load_split(out, split):
    """A split of a cluster job's dataset: its shards (listed, with their
    sha256, in dataset/index.json) verified and stacked."""
    index = json.loads((out / "dataset" / "index.json").read_text())
    assert index["format"] == "distill-dataset-index/1", index["format"]
    xs, ys, start = [], [], 0
    for shard in index[split]["shards"]:
        path = out / shard["key"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"], f"{path}: checksum"
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
        assert meta["format"] == "distill-dataset-shard/1", meta
        assert (meta["split"], int(meta["start"])) == (split, start), meta
        tensors = load_file(str(path))
        x = tensors["features"]
        xs.append(x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64))
        ys.append(tensors["labels"].astype(np.int64))
        assert len(ys[-1]) == shard["rows"] and xs[-1].shape == (shard["rows"], index["dim"])
        start += shard["rows"]
    assert start == index[split]["len"]
    return np.concatenate(xs), np.concatenate(ys)


def check_cluster_output(out):
    report = json.loads((out / "report.json").read_text())
    x, labels = load_split(out, "test")
    assert report["test_examples"] == len(labels)
    assert sum(m["primary"] for m in report["models"]) == 1
    clusters_file = out / "specialists" / "clusters.json"
    clusters = json.loads(clusters_file.read_text())["clusters"] if clusters_file.exists() else []
    for model in report["models"]:
        if model["file"] is None:  # an ensemble has no file of its own
            continue
        layers, _ = load_model(out / model["file"])
        expected = labels
        if model["role"] == "specialist":
            # Its own task: its classes in order, then the dustbin.
            classes = clusters[int(model["name"].rsplit("-", 1)[1])]
            own = {c: i for i, c in enumerate(classes)}
            expected = np.array([own.get(int(c), len(classes)) for c in labels])
        errors = int((forward(layers, x).argmax(axis=1) != expected).sum())
        ours = model["test_errors"]
        print(f"{model['name']} ({model['role']}): numpy {errors} test errors, report {ours}")
        assert abs(errors - ours) <= 2, "numpy evaluation disagrees with ours"
    shards, rows = check_transfer_set(out / "transfer")
    assert shards == report["transfer_set"]["shards"] and rows == report["transfer_set"]["examples"]
    print(f"transfer: {shards} shards, {rows} rows, checksums ok")
    print("artifacts ok")


def main():
    out = Path(sys.argv[1])
    if (out / "dataset" / "index.json").exists():
        return check_cluster_output(out)
    mnist = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(
        os.environ.get("DATASETS_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets")
    ) / "mnist"
    report = json.loads((out / "report.json").read_text())
    images = read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    labels = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    for model in report["models"]:
        layers, norm = load_model(out / Path(model["model_file"]).name)
        assert norm == "divide_by_255", norm
        x = images.astype(np.float64) / 255.0
        errors = int((forward(layers, x).argmax(axis=1) != labels).sum())
        ours = model["test"]["errors"]
        print(f"{model['role']}: numpy {errors} test errors, report {ours}")
        assert abs(errors - ours) <= 2, "numpy evaluation disagrees with ours"
    for folder in sorted(out.glob("transfer-*")):
        shards, rows = check_transfer_set(folder)
        print(f"{folder.name}: {shards} shards, {rows} rows, checksums ok")
    print("artifacts ok")


if __name__ == "__main__":
    main()
