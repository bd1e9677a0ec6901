#!/usr/bin/env python3
"""PyTorch reference for the distillation cluster: the same work as our Rust
(candle) code, to compare speed and accuracy.

Setup (creates a venv outside the repository and prints its python):

    PY=$(bash bench/pytorch_setup.sh | tail -n 1)

Subcommands:

    # Step throughput at batch 128 (inference at 1024) on random MNIST-like
    # data, with the machine's fp32 GEMM rate on each step's own shapes:
    $PY bench/pytorch_reference.py throughput --threads 2 --steps 200 --out tp.json

    # The whole MNIST pipeline as the cluster runs it (examples/mnist.toml):
    # K teachers, the hard-label baseline, teacher inference over the
    # training split, the distilled student, evaluation on the test set:
    $PY bench/pytorch_reference.py pipeline --datasets-dir ../shared/datasets \
        --dataset mnist --epochs 20 --threads 2 --seed 1 --teachers 1 --out run.json

    # Checks the building blocks (jitter, max-norm, schedule, loss gradient,
    # optimizer) against the formulas of the Rust code; runs in a second:
    $PY bench/pytorch_reference.py selftest

Everything mirrors the Rust crates `distill` and `common` (file names are
given in each docstring): He-normal initialisation with zero biases,
inverted dropout on the input and on every hidden layer, max-norm on each
unit's incoming weight vector after every step, zero-filled +-2 pixel jitter,
PyTorch-convention Nesterov SGD (which our optimiser copies), one epoch of
linear warm-up then cosine decay to 0 per step, best-validation epoch
selection (ties: the later epoch), a seeded 5000-example validation split
kept in original order, a transfer set cut into shards that the student
visits in random order (rows shuffled within a shard), soft targets as the
arithmetic mean of the teachers' softmax(z/T) computed in float64.
Random streams differ from the Rust ones (ChaCha8 there, torch's Philox /
Mersenne generators here), so results agree statistically, not bitwise;
each model still gets its own seed derived like the cluster's
(`derive_seed`) and separate streams per purpose (init, shuffle, dropout,
jitter, split).

All computation is float32 on the CPU; `--threads` sets torch's intra-op
thread count.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------
# Constants of the cluster's MNIST configuration (examples/mnist.toml and the
# defaults of distill/src/hparams.rs).
# --------------------------------------------------------------------------

INPUT_DIM = 784
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
TEACHER_HIDDEN = [1200, 1200]
STUDENT_HIDDEN = [800, 800]
BATCH = 128
INFERENCE_BATCH = 1024  # distill/src/eval.rs INFERENCE_BATCH
VALIDATION_SIZE = 5000
TRANSFER_SHARDS = 11  # examples/mnist.toml transfer_shards
TEMPERATURE = 20.0
HARD_WEIGHT = 0.1

# common/src/seed.rs `Stream`: one random stream per purpose.
STREAM_INIT, STREAM_SHUFFLE, STREAM_DROPOUT, STREAM_JITTER, STREAM_SPLIT = 1, 2, 3, 4, 6

# MD5 of the uncompressed IDX files (../shared/datasets/README.md).
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model (distill/src/hparams.rs `TrainConfig`)."""

    epochs: int = 10
    batch_size: int = BATCH
    learning_rate: float = 0.05
    warmup_epochs: int = 1
    final_lr_fraction: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0
    max_norm: float | None = None
    jitter_pixels: int = 0


def teacher_config(epochs: int) -> TrainConfig:
    """The teachers' training (examples/mnist.toml `[teachers.train]`)."""
    return TrainConfig(
        epochs=epochs,
        learning_rate=0.1,
        input_dropout=0.2,
        hidden_dropout=0.5,
        max_norm=4.0,
        jitter_pixels=2,
    )


def student_config(epochs: int) -> TrainConfig:
    """The student's and the baseline's training (`[student.train]`)."""
    return TrainConfig(epochs=epochs, learning_rate=0.05)


# --------------------------------------------------------------------------
# Seeds (common/src/seed.rs, coordinator/src/config.rs `derive_seed`).
# --------------------------------------------------------------------------


def derive_seed(job_seed: int, name: str) -> int:
    """The training seed of model `name`: the first 8 bytes (little-endian)
    of sha256(job_seed as u64 LE, name), as the coordinator derives it."""
    digest = hashlib.sha256(job_seed.to_bytes(8, "little") + name.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one purpose (`stream`) of `seed`. The Rust code
    uses ChaCha8 with a stream id; here the pair is hashed into a seed."""
    digest = hashlib.sha256(seed.to_bytes(8, "little") + stream.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------
# Data (common/src/dataset/idx.rs and mod.rs).
# --------------------------------------------------------------------------


def read_idx(path: Path, expected_md5: str | None = None) -> np.ndarray:
    """Reads an IDX file of unsigned bytes, gzip-compressed or raw (detected
    by the gzip magic, as the Rust reader does), checking the header and the
    data length; warns when the uncompressed MD5 differs from the published
    one (the Rust loader does not check it)."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if expected_md5 is not None and hashlib.md5(data).hexdigest() != expected_md5:
        print(f"warning: {path}: MD5 of the content differs from the published one", file=sys.stderr)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndims = data[3]
    header = 4 + 4 * ndims
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndims)]
    if len(data) - header != math.prod(dims):
        raise ValueError(f"{path}: dimensions {dims} do not match {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    """`stem.gz` if present, else the uncompressed `stem` (idx.rs `find_file`)."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found in {folder}")


def load_mnist_folder(folder: Path, name: str):
    """Loads an MNIST-style folder as ((train_x, train_y), (test_x, test_y)):
    features float32 `[n, 784]` = pixel / 255, labels int64."""
    md5 = IDX_MD5.get(name, {})
    out = []
    for prefix in ("train", "t10k"):
        images_stem, labels_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        images = read_idx(find_idx(folder, images_stem), md5.get(images_stem))
        labels = read_idx(find_idx(folder, labels_stem), md5.get(labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} disagree")
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0))
        y = torch.from_numpy(labels.astype(np.int64))
        out.append((x, y))
    return out[0], out[1]


def split_validation(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """Holds out `size` examples chosen at random from `seed` (the job seed,
    Split stream); both parts keep the original order (mod.rs
    `split_validation`). Returns ((train_x, train_y), (val_x, val_y))."""
    order = torch.randperm(len(y), generator=generator(seed, STREAM_SPLIT))
    held_out = order[:size].sort().values
    kept = order[size:].sort().values
    return (x[kept], y[kept]), (x[held_out], y[held_out])


def shard_ranges(n: int, shards: int) -> list[range]:
    """Cuts 0..n into `shards` contiguous ranges whose sizes differ by at
    most one, earlier ones larger (mod.rs `shard_ranges`)."""
    base, extra = divmod(n, shards)
    ranges, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


# --------------------------------------------------------------------------
# Model (distill/src/model.rs).
# --------------------------------------------------------------------------


class Mlp(torch.nn.Module):
    """ReLU MLP; layer i holds weight `[out, in]` and bias `[out]`, no ReLU on
    the last layer (whose outputs are the logits)."""

    def __init__(self, input_dim: int, hidden: list[int], num_classes: int, gen: torch.Generator):
        """He-normal weights (std sqrt(2 / fan_in)) from `gen`, zero biases."""
        super().__init__()
        sizes = [input_dim, *hidden, num_classes]
        self.widths = sizes[:-1]  # inputs of each layer: where dropout masks go
        self.layers = torch.nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layer = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                layer.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                layer.bias.zero_()
            self.layers.append(layer)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits; `masks[i]`, when given, multiplies the input of layer i."""
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if masks is not None and masks[i] is not None:
                h = h * masks[i]
            h = F.linear(h, layer.weight, layer.bias)
            if i < last:
                h = torch.relu(h)
        return h

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> None:
        """Rescales every unit's incoming weight vector (a row of `weight`)
        whose L2 norm exceeds `max_norm` down to that norm, in every layer."""
        for layer in self.layers:
            w = layer.weight
            norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            w.mul_(max_norm / norms.clamp_(min=max_norm))


def dropout_masks(model: Mlp, batch: int, p_input: float, p_hidden: float, gen: torch.Generator):
    """Inverted-dropout masks, one per layer input (the input features and
    every hidden layer): 0 with probability p, else 1 / (1 - p); None where
    p is 0 (model.rs `sample_dropout_masks`)."""
    masks = []
    for i, width in enumerate(model.widths):
        p = p_input if i == 0 else p_hidden
        if p <= 0.0:
            masks.append(None)
            continue
        # u < p drops, as in the Rust code; ge_ leaves 1.0 where u >= p.
        keep = torch.rand(batch, width, generator=gen).ge_(p)
        masks.append(keep.mul_(1.0 / (1.0 - p)))
    return masks


# --------------------------------------------------------------------------
# Augmentation (distill/src/augment.rs).
# --------------------------------------------------------------------------


def jitter_images(x: torch.Tensor, height: int, width: int, max_shift: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Shifts each image by a random (dy, dx) in -max_shift..=max_shift,
    out[y][x] = in[y - dy][x - dx] where that is inside, else 0."""
    if max_shift == 0:
        return x
    b = x.shape[0]
    m = max_shift
    dy = torch.randint(-m, m + 1, (b,), generator=gen)
    dx = torch.randint(-m, m + 1, (b,), generator=gen)
    # Zero-pad by m on every side, then read each output pixel (y, x) from
    # padded (y - dy + m, x - dx + m): one gather over flat indices.
    pw = width + 2 * m
    padded = F.pad(x.reshape(b, height, width), (m, m, m, m)).reshape(b, -1)
    base = (torch.arange(height).view(-1, 1) * pw + torch.arange(width).view(1, -1)).view(1, -1)
    offset = ((m - dy) * pw + (m - dx)).view(b, 1)
    return padded.gather(1, base + offset)


# --------------------------------------------------------------------------
# Losses (distill/src/loss.rs), schedule (schedule.rs), optimiser (optim.rs).
# --------------------------------------------------------------------------


def distillation_loss(logits, soft_targets, labels, temperature: float, hard_weight: float):
    """T^2 * CE(soft_targets, softmax(z / T)) + hard_weight * CE(labels,
    softmax(z)), both cross-entropies averaged over the batch."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    soft = -(soft_targets * log_q).sum(dim=-1).mean() * (temperature * temperature)
    if hard_weight == 0.0:
        return soft
    return soft + F.cross_entropy(logits, labels) * hard_weight


def mean_entropy(targets: torch.Tensor) -> float:
    """Mean entropy (nats) of the rows of `targets`, in float64 (train.rs
    `mean_entropy`); subtracted from the reported distillation loss only."""
    p = targets.double()
    return float(-(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum() / max(p.shape[0], 1))


def learning_rate(step: int, base: float, warmup_steps: int, total_steps: int,
                  final_fraction: float) -> float:
    """0-based `step`: linear from base / warmup_steps up to base over the
    warm-up, then a cosine from base down to base * final_fraction at
    total_steps, flat after."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (final_fraction + (1.0 - final_fraction) * cosine)


def make_optimizer(model: Mlp, cfg: TrainConfig) -> torch.optim.SGD:
    """torch.optim.SGD with dampening 0, which is exactly our SgdMomentum:
    v = m v + g; d = g + m v (Nesterov) or v; w -= lr d. Weight decay goes
    on matrices only, as in optim.rs."""
    weights = [l.weight for l in model.layers]
    biases = [l.bias for l in model.layers]
    return torch.optim.SGD(
        [
            {"params": weights, "weight_decay": cfg.weight_decay},
            {"params": biases, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        dampening=0.0,
    )


# --------------------------------------------------------------------------
# Training (distill/src/train.rs) and evaluation (eval.rs).
# --------------------------------------------------------------------------


class Stepper:
    """The state of one training run's optimisation steps (train.rs
    `Stepper`): model, optimiser, schedule, dropout and jitter streams."""

    def __init__(self, model: Mlp, cfg: TrainConfig, seed: int, steps_per_epoch: int,
                 distill: tuple[float, float] | None = None):
        """`distill` is (temperature, hard_weight) when learning from soft
        targets, None for hard labels."""
        self.model = model
        self.cfg = cfg
        self.distill = distill
        self.optimizer = make_optimizer(model, cfg)
        self.warmup_steps = cfg.warmup_epochs * steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.dropout_gen = generator(seed, STREAM_DROPOUT)
        self.jitter_gen = generator(seed, STREAM_JITTER)
        self.step = 0
        self.lr = 0.0

    def run(self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None = None) -> float:
        """One step on a batch: jitter, dropout masks, forward, loss,
        backward, SGD update at this step's learning rate, max-norm. Returns
        the loss as reported (the distillation loss minus the targets'
        constant entropy term)."""
        cfg, model = self.cfg, self.model
        if cfg.jitter_pixels > 0:
            x = jitter_images(x, *IMAGE_SHAPE, cfg.jitter_pixels, self.jitter_gen)
        masks = dropout_masks(model, x.shape[0], cfg.input_dropout, cfg.hidden_dropout, self.dropout_gen)
        logits = model(x, masks)
        constant = 0.0
        if self.distill is not None and soft is not None:
            temperature, hard_weight = self.distill
            loss = distillation_loss(logits, soft, labels, temperature, hard_weight)
            constant = temperature * temperature * mean_entropy(soft)
        else:
            loss = F.cross_entropy(logits, labels)
        self.lr = learning_rate(self.step, cfg.learning_rate, self.warmup_steps, self.total_steps,
                                cfg.final_lr_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if cfg.max_norm is not None:
            model.apply_max_norm(cfg.max_norm)
        self.step += 1
        return loss.item() - constant


@torch.no_grad()
def predict_logits(model: Mlp, x: torch.Tensor) -> torch.Tensor:
    """Logits of every row of `x`, in batches of INFERENCE_BATCH, no dropout."""
    return torch.cat([model(x[s : s + INFERENCE_BATCH]) for s in range(0, len(x), INFERENCE_BATCH)])


def count_errors(model: Mlp, x: torch.Tensor, y: torch.Tensor) -> int:
    """Misclassified rows (arg-max, first maximum on ties)."""
    return int((predict_logits(model, x).argmax(dim=1) != y).sum())


def soft_targets(member_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Arithmetic mean over the members of softmax(z / T), computed in
    float64 and returned as float32 (common/src/transfer/targets.rs)."""
    probs = [torch.softmax(z.double() / temperature, dim=-1) for z in member_logits]
    return (sum(probs) / len(probs)).float()


def train_model(name: str, model: Mlp, seed: int, cfg: TrainConfig, train, validation,
                transfer: dict | None = None, log=print) -> dict:
    """Trains `model` on `train` = (x, y) for cfg.epochs, validating on
    `validation` after each epoch, and leaves it with the weights of the
    epoch with the fewest validation errors (ties: the later epoch).

    `transfer`, when given, holds "soft" (`[n, classes]` soft targets of the
    training rows), "shards" (index ranges), "temperature", "hard_weight":
    each epoch visits the shards in random order and the rows of each shard
    in random order, batches never crossing a shard boundary (train.rs,
    `Targets::Transfer`). Returns the per-model report."""
    x_train, y_train = train
    x_val, y_val = validation
    bs = cfg.batch_size
    if transfer is None:
        steps_per_epoch = math.ceil(len(y_train) / bs)
        distill = None
    else:
        steps_per_epoch = sum(math.ceil(len(r) / bs) for r in transfer["shards"])
        distill = (transfer["temperature"], transfer["hard_weight"])
    stepper = Stepper(model, cfg, seed, steps_per_epoch, distill)
    shuffle_gen = generator(seed, STREAM_SHUFFLE)
    epochs, best = [], None
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        loss_sum, steps = 0.0, 0
        if transfer is None:
            order = torch.randperm(len(y_train), generator=shuffle_gen)
            batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        else:
            batches = []
            for k in torch.randperm(len(transfer["shards"]), generator=shuffle_gen).tolist():
                shard = transfer["shards"][k]
                rows = torch.randperm(len(shard), generator=shuffle_gen) + shard.start
                batches.extend(rows[s : s + bs] for s in range(0, len(rows), bs))
        for idx in batches:
            soft = transfer["soft"][idx] if transfer is not None else None
            loss_sum += stepper.run(x_train[idx], y_train[idx], soft)
            steps += 1
        seconds = time.perf_counter() - started
        val_errors = count_errors(model, x_val, y_val)
        stats = {
            "epoch": epoch,
            "mean_loss": loss_sum / max(steps, 1),
            "validation_errors": val_errors,
            "learning_rate": stepper.lr,
            "seconds": seconds,
            "examples_per_second": len(y_train) / seconds,
        }
        epochs.append(stats)
        log(f"{name}: epoch {epoch}/{cfg.epochs} loss {stats['mean_loss']:.4f} "
            f"validation errors {val_errors} {seconds:.1f} s ({stats['examples_per_second']:.0f} ex/s)")
        if best is None or val_errors <= best[1]:
            best = (epoch, val_errors, {k: v.clone() for k, v in model.state_dict().items()})
    selected_epoch, val_errors, state = best
    model.load_state_dict(state)
    return {
        "validation_errors": val_errors,
        "selected_epoch": selected_epoch,
        "seconds_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs),
        "epochs": epochs,
    }


# --------------------------------------------------------------------------
# Subcommand: pipeline.
# --------------------------------------------------------------------------


def run_pipeline(args) -> dict:
    """The cluster's job on one machine, stage after stage: load and split
    the data, train the teachers and the baseline, compute the teachers'
    logits over the training split shard by shard, distil the student,
    evaluate everything on the test set."""
    wall_started = time.perf_counter()
    stages: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - wall_started:8.1f} s] {msg}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    (x_full, y_full), test = load_mnist_folder(Path(args.datasets_dir) / args.dataset, args.dataset)
    train, validation = split_validation(x_full, y_full, args.validation_size, args.seed)
    stages["load_data"] = time.perf_counter() - t
    log(f"{args.dataset}: {len(train[1])} train, {len(validation[1])} validation, {len(test[1])} test")

    models: dict[str, dict] = {}
    nets: dict[str, Mlp] = {}

    def fit(name, hidden, cfg, transfer=None):
        seed = derive_seed(args.seed, name)
        net = Mlp(INPUT_DIM, hidden, NUM_CLASSES, generator(seed, STREAM_INIT))
        t = time.perf_counter()
        models[name] = train_model(name, net, seed, cfg, train, validation, transfer, log)
        stages[name] = time.perf_counter() - t
        nets[name] = net

    teachers = [f"teacher-{k}" for k in range(args.teachers)]
    for name in teachers:
        fit(name, TEACHER_HIDDEN, teacher_config(args.epochs))
    fit("baseline", STUDENT_HIDDEN, student_config(args.epochs))

    t = time.perf_counter()
    shards = shard_ranges(len(train[1]), args.transfer_shards)
    logits = {
        name: torch.cat([predict_logits(nets[name], train[0][r.start : r.stop]) for r in shards])
        for name in teachers
    }
    stages["teacher_inference"] = time.perf_counter() - t
    log(f"teacher inference: {len(train[1])} rows x {len(teachers)} teacher(s) "
        f"in {stages['teacher_inference']:.1f} s")

    transfer = {
        "soft": soft_targets([logits[n] for n in teachers], args.temperature),
        "shards": shards,
        "temperature": args.temperature,
        "hard_weight": args.hard_weight,
    }
    fit("student", STUDENT_HIDDEN, student_config(args.epochs), transfer)

    t = time.perf_counter()
    for name in [*teachers, "baseline", "student"]:
        models[name]["test_errors"] = count_errors(nets[name], *test)
    if len(teachers) > 1:
        # The ensemble: arithmetic mean of the members' softmax at T = 1.
        def ensemble_errors(x, y):
            probs = soft_targets([predict_logits(nets[n], x) for n in teachers], 1.0)
            return int((probs.argmax(dim=1) != y).sum())

        models["ensemble"] = {
            "test_errors": ensemble_errors(*test),
            "validation_errors": ensemble_errors(*validation),
        }
    stages["evaluate"] = time.perf_counter() - t

    for name, m in models.items():
        log(f"{name}: {m['test_errors']} test errors, {m['validation_errors']} validation errors"
            + (f", epoch {m['selected_epoch']} kept" if "selected_epoch" in m else ""))
    # Key order as documented: the summary first, the per-epoch history last.
    ordered = {}
    for name, m in models.items():
        ordered[name] = {k: m[k] for k in ("test_errors", "validation_errors", "selected_epoch",
                                           "seconds_per_epoch", "epochs") if k in m}
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "dataset": args.dataset,
        "epochs": args.epochs,
        "seed": args.seed,
        "teachers": args.teachers,
        "transfer_shards": args.transfer_shards,
        "temperature": args.temperature,
        "hard_weight": args.hard_weight,
        "wall_seconds": time.perf_counter() - wall_started,
        "stages": stages,
        "models": ordered,
    }


# --------------------------------------------------------------------------
# Subcommand: throughput.
# --------------------------------------------------------------------------


def gemm_shapes(sizes: list[int], batch: int, backward: bool) -> list[tuple[int, int, int]]:
    """The (M, K, N) of every matrix product one step does, for layer widths
    `sizes` (input first): forward x[B, in] @ W[in, out] per layer; with
    `backward`, also the weight gradient [in, B] @ [B, out] of every layer
    and the input gradient [B, out] @ [out, in] of every layer but the first."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    shapes = [(batch, i, o) for i, o in layers]
    if backward:
        shapes += [(i, batch, o) for i, o in layers]
        shapes += [(batch, o, i) for i, o in layers[1:]]
    return shapes


def measure_gemm(shapes, batch: int, repeats: int, min_seconds: float) -> dict:
    """Times the sequence of torch.matmul calls on random float32 tensors of
    `shapes`: enough passes per repeat to last `min_seconds`, `repeats`
    repeats. Returns flops per example and the GFLOP/s of each repeat."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def one_pass():
        for a, b in pairs:
            torch.matmul(a, b)

    for _ in range(3):
        one_pass()
    t = time.perf_counter()
    calib = 0
    while time.perf_counter() - t < 0.05 or calib < 3:
        one_pass()
        calib += 1
    per_pass = (time.perf_counter() - t) / calib
    passes = max(1, math.ceil(min_seconds / per_pass))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(passes):
            one_pass()
        rates.append(flops * passes / (time.perf_counter() - t) / 1e9)
    return {"flops_per_example": flops / batch, "gemm_gflops_repeats": rates,
            "gemm_gflops_median": statistics.median(rates)}


def time_steps(step, warmup: int, steps: int) -> float:
    """Calls `step()` `warmup` times, then times `steps` calls; seconds."""
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t


def run_throughput(args) -> dict:
    """Examples per second of the four kinds of step on random MNIST-like
    data (pixels uniform in [0, 1], random labels), each next to the GEMM
    rate of its own matrix shapes."""
    gen = torch.Generator().manual_seed(args.seed)
    pool = max(min((args.warmup + args.steps) * BATCH, 60_000), 2 * INFERENCE_BATCH)
    x_pool = torch.rand(pool, INPUT_DIM, generator=gen)
    y_pool = torch.randint(0, NUM_CLASSES, (pool,), generator=gen)
    # Soft targets from random "teacher" logits at T = 20 (cost does not
    # depend on the values).
    soft_pool = soft_targets([torch.randn(pool, NUM_CLASSES, generator=gen) * 5.0], TEMPERATURE)

    def batches(batch):
        """An endless stream of random batches of row indices, gathered from
        the pool like the Rust loop gathers each batch from the dataset."""
        while True:
            order = torch.randperm(pool, generator=gen)
            for s in range(0, pool - batch + 1, batch):
                yield order[s : s + batch]

    teacher_cfg = replace(teacher_config(1), jitter_pixels=args.jitter)
    plain_cfg = student_config(1)
    total = args.warmup + args.steps
    figures = {}

    def train_figure(name, hidden, cfg, distill):
        model = Mlp(INPUT_DIM, hidden, NUM_CLASSES, generator(args.seed, STREAM_INIT))
        stepper = Stepper(model, cfg, args.seed, total, distill)
        it = batches(BATCH)

        def step():
            idx = next(it)
            stepper.run(x_pool[idx], y_pool[idx], soft_pool[idx] if distill else None)

        seconds = time_steps(step, args.warmup, args.steps)
        figures[name] = {"examples_per_second": args.steps * BATCH / seconds,
                         "hidden": hidden, "batch": BATCH}
        print(f"{name}: {figures[name]['examples_per_second']:.0f} examples/s", file=sys.stderr, flush=True)

    train_figure("teacher_train", TEACHER_HIDDEN, teacher_cfg, None)
    train_figure("student_train", STUDENT_HIDDEN, plain_cfg, None)
    train_figure("distill_step", STUDENT_HIDDEN, plain_cfg, (TEMPERATURE, HARD_WEIGHT))

    teacher = Mlp(INPUT_DIM, TEACHER_HIDDEN, NUM_CLASSES, generator(args.seed, STREAM_INIT))
    it = batches(INFERENCE_BATCH)

    @torch.no_grad()
    def infer():
        teacher(x_pool[next(it)])

    # As many examples as a training figure (at least 3 batches of 1024).
    infer_steps = max(3, math.ceil(args.steps * BATCH / INFERENCE_BATCH))
    seconds = time_steps(infer, max(2, math.ceil(args.warmup * BATCH / INFERENCE_BATCH)), infer_steps)
    figures["teacher_infer"] = {"examples_per_second": infer_steps * INFERENCE_BATCH / seconds,
                                "hidden": TEACHER_HIDDEN, "batch": INFERENCE_BATCH}
    print(f"teacher_infer: {figures['teacher_infer']['examples_per_second']:.0f} examples/s",
          file=sys.stderr, flush=True)

    sizes = {"teacher": [INPUT_DIM, *TEACHER_HIDDEN, NUM_CLASSES],
             "student": [INPUT_DIM, *STUDENT_HIDDEN, NUM_CLASSES]}
    gemms = {
        "teacher_train": (sizes["teacher"], BATCH, True),
        "student_train": (sizes["student"], BATCH, True),
        "distill_step": (sizes["student"], BATCH, True),
        "teacher_infer": (sizes["teacher"], INFERENCE_BATCH, False),
    }
    for name, (layer_sizes, batch, backward) in gemms.items():
        shapes = gemm_shapes(layer_sizes, batch, backward)
        g = measure_gemm(shapes, batch, args.gemm_repeats, args.gemm_seconds)
        fig = figures[name]
        fig.update(g)
        fig["gemm_shapes_mkn"] = [f"{m}x{k}x{n}" for m, k, n in shapes]
        step_flops = fig["examples_per_second"] * g["flops_per_example"]
        fig["fraction_of_gemm"] = step_flops / (g["gemm_gflops_median"] * 1e9)
        print(f"{name}: GEMM {g['gemm_gflops_median']:.1f} GFLOP/s, step reaches "
              f"{fig['fraction_of_gemm']:.2f} of it", file=sys.stderr, flush=True)

    keys = ("examples_per_second", "flops_per_example", "gemm_gflops_median", "gemm_gflops_repeats",
            "fraction_of_gemm", "batch", "hidden", "gemm_shapes_mkn")
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "teacher_jitter_pixels": args.jitter,
        "figures": {name: {k: fig[k] for k in keys} for name, fig in figures.items()},
    }


# --------------------------------------------------------------------------
# Subcommand: selftest.
# --------------------------------------------------------------------------


def run_selftest(_args) -> dict:
    """Checks the building blocks against the formulas of the Rust code (and
    the reference loops of its unit tests). Raises AssertionError on a
    mismatch."""
    gen = torch.Generator().manual_seed(1)
    checks = {}

    # Jitter: every output is one of the allowed zero-filled shifts (augment.rs test).
    h, w = 5, 6
    img = torch.arange(1, 31, dtype=torch.float32)
    out = jitter_images(img.repeat(40, 1), h, w, 2, gen)

    def shift_ref(dy, dx):
        ref = torch.zeros(h, w)
        src = img.view(h, w)
        for y in range(h):
            for x in range(w):
                if 0 <= y - dy < h and 0 <= x - dx < w:
                    ref[y, x] = src[y - dy, x - dx]
        return ref.flatten()

    refs = {(dy, dx): shift_ref(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    seen = set()
    for row in out:
        match = [s for s, r in refs.items() if torch.equal(r, row)]
        assert match, "jitter output is not a shift of at most 2 pixels"
        seen.add(match[0])
    assert len(seen) > 10, f"shifts vary: {seen}"
    checks["jitter"] = f"{len(seen)} distinct shifts, all exact"

    # Max-norm (model.rs test): [3, 4] -> [0.6, 0.8], [0.3, 0.4] untouched.
    m = Mlp(2, [2], 2, gen)
    with torch.no_grad():
        m.layers[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    m.apply_max_norm(1.0)
    assert torch.allclose(m.layers[0].weight, torch.tensor([[0.6, 0.8], [0.3, 0.4]]), atol=1e-6)
    checks["max_norm"] = "ok"

    # Schedule (schedule.rs test).
    lr = lambda s: learning_rate(s, 0.1, 10, 110, 0.0)  # noqa: E731
    assert abs(lr(0) - 0.01) < 1e-12 and abs(lr(9) - 0.1) < 1e-12 and abs(lr(10) - 0.1) < 1e-12
    assert abs(lr(60) - 0.05) < 1e-12 and abs(lr(110)) < 1e-12 and abs(lr(500)) < 1e-12
    checks["schedule"] = "ok"

    # Distillation loss gradient: T (softmax(z/T) - p) / B + w (softmax(z) - onehot) / B.
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.float64) / 2.0, dim=1)
    y = torch.tensor([3, 0, 2])
    for t, wgt in [(1.0, 0.0), (2.0, 0.5), (20.0, 0.1)]:
        z.grad = None
        distillation_loss(z, p, y, t, wgt).backward()
        want = (t * (torch.softmax(z / t, 1) - p) + wgt * (torch.softmax(z, 1) - F.one_hot(y, 4))) / 3
        assert torch.allclose(z.grad, want.detach(), atol=1e-12), (t, wgt)
    checks["distillation_loss"] = "gradient matches"

    # Optimiser (optim.rs test): three Nesterov steps on 0.5 * |w|^2.
    for momentum, nesterov in [(0.0, False), (0.9, False), (0.9, True)]:
        wv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([wv], lr=0.1, momentum=momentum, nesterov=nesterov, dampening=0.0)
        ref, vel = [1.0, -2.0, 0.5, 3.0], [0.0] * 4
        for _ in range(3):
            opt.zero_grad()
            (0.5 * wv.square().sum()).backward()
            opt.step()
            for i in range(4):
                g = ref[i]
                vel[i] = momentum * vel[i] + g
                ref[i] -= 0.1 * (g + momentum * vel[i] if nesterov else vel[i])
        assert torch.allclose(wv.detach(), torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    checks["sgd_nesterov"] = "ok"

    # Dropout masks: rate and scale (model.rs test).
    net = Mlp(1000, [500], 2, gen)
    masks = dropout_masks(net, 10, 0.2, 0.5, gen)
    for mask, prob in zip(masks, [0.2, 0.5]):
        dropped = float((mask == 0).float().mean())
        assert abs(dropped - prob) < 0.02, (dropped, prob)
        assert bool(((mask == 0) | (mask == torch.tensor(1.0 / (1.0 - prob)))).all())
    checks["dropout"] = "ok"

    # Seeds as the coordinator derives them; shards as mod.rs cuts them.
    assert derive_seed(1, "a") != derive_seed(1, "b") and derive_seed(1, "a") == derive_seed(1, "a")
    assert [len(r) for r in shard_ranges(10, 3)] == [4, 3, 3]
    checks["seeds_and_shards"] = "ok"
    return {"torch_version": torch.__version__, "checks": checks}


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def set_threads(n: int | None) -> None:
    """torch's intra-op threads (and inter-op, when it is still settable)."""
    if n is not None:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass


def main(argv=None) -> int:
    """Parses the command line, runs the subcommand, prints its JSON and
    writes it to --out when given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tp = sub.add_parser("throughput",
                        help="examples/s of each kind of step, with the GEMM rate of its shapes")
    tp.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    tp.add_argument("--steps", type=int, default=200,
                    help="timed steps per training figure (default 200); teacher_infer times as many "
                         "examples in batches of 1024")
    tp.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    tp.add_argument("--jitter", type=int, default=2,
                    help="teacher_train's jitter in pixels (default 2, like the teacher of "
                         "distill/benches/train_throughput.rs; 0 to leave it out)")
    tp.add_argument("--gemm-repeats", type=int, default=7, help="GEMM timing repeats (default 7)")
    tp.add_argument("--gemm-seconds", type=float, default=0.2,
                    help="minimum seconds per GEMM repeat (default 0.2)")
    tp.add_argument("--seed", type=int, default=1)
    tp.add_argument("--out", type=Path, default=None, help="write the JSON here too")

    pl = sub.add_parser("pipeline", help="the whole MNIST distillation pipeline, as the cluster runs it")
    pl.add_argument("--datasets-dir", required=True, help="folder holding mnist/ and fashion-mnist/")
    pl.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    pl.add_argument("--epochs", type=int, default=20, help="epochs of every model (default 20)")
    pl.add_argument("--threads", type=int, default=None)
    pl.add_argument("--seed", type=int, default=1, help="the job seed (default 1)")
    pl.add_argument("--teachers", type=int, default=1, help="number of teachers (default 1)")
    pl.add_argument("--transfer-shards", type=int, default=TRANSFER_SHARDS,
                    help=f"transfer-set shards (default {TRANSFER_SHARDS}, as examples/mnist.toml)")
    pl.add_argument("--validation-size", type=int, default=VALIDATION_SIZE)
    pl.add_argument("--temperature", type=float, default=TEMPERATURE)
    pl.add_argument("--hard-weight", type=float, default=HARD_WEIGHT)
    pl.add_argument("--out", type=Path, default=None)

    st = sub.add_parser("selftest", help="check the building blocks against the Rust formulas")
    st.add_argument("--out", type=Path, default=None)

    args = parser.parse_args(argv)
    if args.command == "throughput" and (args.steps < 1 or args.warmup < 0 or args.gemm_repeats < 1):
        parser.error("--steps and --gemm-repeats must be at least 1, --warmup at least 0")
    set_threads(getattr(args, "threads", None))
    torch.set_default_dtype(torch.float32)
    if args.command == "throughput":
        result = run_throughput(args)
    elif args.command == "pipeline":
        if args.epochs < 1 or args.teachers < 1:
            parser.error("--epochs and --teachers must be at least 1")
        result = run_pipeline(args)
    else:
        result = run_selftest(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
