"""The image task several benchmarks train on: Fashion-MNIST (or CIFAR), a small CNN (or a ResNet-18), SGD, SAM or
XSAM, and one training run with its metrics. benchmarks/paper_regime.py, label_noise.py, cheap_sharpness.py and
paper_plane.py import it; `add_task_flags` gives each of them the task's flags.

A setting (``train_one``'s first argument) is a dict: ``method`` ("sgd", "sam" or "xsam"), ``rho``, ``k`` (ascent
steps), ``probe_every`` (None: once per epoch), ``name``, and optionally ``sharpness_every`` (1) and ``reuse``
(False), the library's cheap modes.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import pickle
import statistics
import time
from collections.abc import Callable

import harness
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hf_xsam import XSAM

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = {
    "fashion_mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; the idx .gz files "
                     f"land in {FASHION_DIR}) or pass --data_dir with the four *-idx?-ubyte.gz files",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it and pass "
               "--data_dir .../cifar-10-batches-py",
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, unpack it and pass "
                "--data_dir .../cifar-100-python",
}


# ---------------------------------------------------------------------- data
def _read_idx(path: str) -> np.ndarray:
    """One idx file (the MNIST format): big-endian magic (dtype code, number of dims), the dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def part(name: str) -> np.ndarray:
        return _read_idx(os.path.join(data_dir, f"{name}.gz"))

    x_train, y_train = part("train-images-idx3-ubyte"), part("train-labels-idx1-ubyte")
    x_test, y_test = part("t10k-images-idx3-ubyte"), part("t10k-labels-idx1-ubyte")
    to_x = lambda a: torch.from_numpy(a.copy()).float().div_(255).unsqueeze(1)  # noqa: E731
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


def load_cifar(data_dir: str, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CIFAR python archive (pickled batches), as float NCHW in [0, 1]."""
    def part(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(os.path.join(data_dir, name), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        return d["data"].reshape(-1, 3, 32, 32), np.asarray(d["labels" if classes == 10 else "fine_labels"])

    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    parts = [part(n) for n in names]
    x_test, y_test = part("test_batch" if classes == 10 else "test")
    x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    to_x = lambda a: torch.from_numpy(a.copy()).float().div_(255)  # noqa: E731
    return to_x(x_train), torch.from_numpy(y_train), to_x(x_test), torch.from_numpy(y_test)


def load_data(dataset: str, data_dir: str | None):
    """(x_train, y_train, x_test, y_test), normalised with the training set's per-channel mean and sd."""
    data_dir = data_dir or (FASHION_DIR if dataset == "fashion_mnist" else None)
    if data_dir is None or not os.path.isdir(data_dir):
        raise SystemExit(f"--data_dir={data_dir!r} does not exist: {INSTALL_HINT[dataset]}")
    try:
        if dataset == "fashion_mnist":
            data = load_fashion_mnist(data_dir)
        else:
            data = load_cifar(data_dir, 10 if dataset == "cifar10" else 100)
    except FileNotFoundError as err:
        raise SystemExit(f"{err}: {INSTALL_HINT[dataset]}") from err
    x_train, y_train, x_test, y_test = data
    mean, sd = x_train.mean(dim=(0, 2, 3), keepdim=True), x_train.std(dim=(0, 2, 3), keepdim=True)
    return (x_train - mean) / sd, y_train, (x_test - mean) / sd, y_test


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (a shift of up to ``pad`` pixels each way) and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * pad + 1):  # one slice per offset pair: (2 pad + 1)^2 slices instead of n
        for ox in range(2 * pad + 1):
            idx = ((dy == oy) & (dx == ox)).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = padded[idx, :, oy:oy + h, ox:ox + w]
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        out[flipped] = out[flipped].flip(3)
    return out


# ---------------------------------------------------------------------- models
def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Sequential):
    """A narrow VGG-style CNN with BatchNorm: stages of width w, 2w, 4w, max-pooling between, global average pool."""

    def __init__(self, in_channels: int, classes: int, width: int):
        super().__init__(conv_bn(in_channels, width), nn.MaxPool2d(2),
                         conv_bn(width, 2 * width), conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),
                         conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, classes))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, stride), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNet18(nn.Sequential):
    """The CIFAR ResNet-18 (3x3 stem, no max-pool; stages of 2 basic blocks at widths w, 2w, 4w, 8w; w = 64)."""

    def __init__(self, in_channels: int, classes: int, width: int = 64):
        layers, c = [conv_bn(in_channels, width)], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [BasicBlock(c, c_out, 1 if stage == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c = c_out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def build_model(name: str, in_channels: int, classes: int, width: int) -> nn.Module:
    if name == "cnn":
        return SmallCNN(in_channels, classes, width)
    return ResNet18(in_channels, classes, width)


# ---------------------------------------------------------------------- optimizers
def make_optimizer(model: nn.Module, setting: dict, args, steps_per_epoch: int) -> torch.optim.Optimizer:
    base = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if setting["method"] == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    every = steps_per_epoch if setting["probe_every"] is None else setting["probe_every"]
    alpha = 1.0  # SAM is alpha = 1 with no probe; XSAM starts there and the step-0 probe moves it
    return XSAM(model.parameters(), torch.optim.SGD, rho=setting["rho"], rho_max=2 * setting["rho"], alpha=alpha,
                ascent_steps=setting["k"], probe_every=every, sharpness_every=setting.get("sharpness_every", 1),
                reuse=setting.get("reuse", False), **base)


# ---------------------------------------------------------------------- training
def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def make_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, psis: list[float]) -> Callable:
    """The optimizer's closure, which also measures psi = angle(theta_k - theta_0, g_k) from outside the optimizer.

    step(closure) does not return XSAM's DirectionInfo, and SAM (alpha = 1, no probe) skips the geometry, so psi is
    measured here for both: the first backward call runs at theta_0, the (k+1)-th at theta_k with g_k in .grad.
    Two flat copies of a small model's weights cost nothing next to the passes.
    """
    calls, theta_0 = 0, None

    def closure(backward: bool = True) -> torch.Tensor:
        nonlocal calls, theta_0
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
            if calls == 0:
                theta_0 = flat_params(model)
            elif calls == k:
                e, g = flat_params(model) - theta_0, flat_grads(model)
                cos = (e @ g / (e.norm() * g.norm()).clamp_min(1e-12)).clamp(-1, 1)
                psis.append(math.acos(cos.item()))
            calls += 1
        return loss

    return closure


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean loss) in eval mode (BatchNorm running statistics)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
    model.train()
    return correct / len(x), loss / len(x)


def prepare_data(args) -> tuple[tuple, tuple | None]:
    """(x_train, y_train, x_test, y_test) and the clean validation set (x_val, y_val) or None: the fixed training
    subset of --train_size, --val_size images held out of the rest of the pool, then --label_noise on the subset."""
    x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
    if args.pad is None:
        args.pad = 2 if x_train.shape[-1] <= 28 else 4
    val = None
    if args.train_size or args.val_size:  # a fixed subset for every seed and method: the seed varies init, order, aug
        if args.train_size + args.val_size > len(x_train):
            raise ValueError(f"--train_size={args.train_size} + --val_size={args.val_size} is invalid: the training "
                             f"pool has {len(x_train)} images")
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1234))
        held = perm[len(perm) - args.val_size:]
        val = (x_train[held], y_train[held]) if args.val_size else None
        pick = perm[: args.train_size or len(perm) - args.val_size]
        x_train, y_train = x_train[pick], y_train[pick]
    if args.label_noise:
        noisy = harness.example("_common").symmetric_label_noise(
            y_train.tolist(), int(y_test.max()) + 1, args.label_noise, args.label_noise_seed)
        y_train = torch.tensor(noisy, dtype=y_train.dtype)
    return (x_train, y_train, x_test, y_test), val


def train_one(setting: dict, seed: int, data, args, checkpoint: str | None = None, val: tuple | None = None) -> dict:
    """One run; returns its metrics. The seed fixes the initial weights, the batch order and the augmentation.
    ``train_acc`` is on the labels trained on (noisy ones under --label_noise); ``val_acc`` when ``val`` is given."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model(args.model, x_train.shape[1], int(y_train.max()) + 1, args.width).to(args.device)
    steps_per_epoch = len(x_train) // args.batch_size  # drop_last: every epoch has the same steps
    opt = make_optimizer(model, setting, args, steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    data_rng = torch.Generator().manual_seed(10_000 + seed)
    psis, alphas, corrections, epoch_seconds, train_losses = [], [], [], [], []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=data_rng)
        xs = augment(x_train[order], args.pad, args.flip, data_rng).to(args.device)
        ys = y_train[order].to(args.device)
        running = 0.0
        for i in range(steps_per_epoch):
            x, y = xs[i * args.batch_size:(i + 1) * args.batch_size], ys[i * args.batch_size:(i + 1) * args.batch_size]
            if setting["method"] == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            else:
                probing = opt.probe_due
                loss = opt.step(make_closure(model, x, y, setting["k"], psis))
                if probing:
                    alphas.append(opt.alpha)
                direction = opt.last_step_info.direction
                if direction is not None and direction.correction is not None:
                    corrections.append(direction.correction)
            schedule.step()
            running += loss.item()
        epoch_seconds.append(time.perf_counter() - start)
        train_losses.append(running / steps_per_epoch)
        if checkpoint and epoch + 1 == args.epochs // 2:
            torch.save(model.state_dict(), f"{checkpoint}_mid.pt")
    if checkpoint:
        torch.save(model.state_dict(), f"{checkpoint}_end.pt")
    train_acc, train_loss = accuracy(model, x_train.to(args.device), y_train.to(args.device))
    test_acc, test_loss = accuracy(model, x_test.to(args.device), y_test.to(args.device))
    extra = {}
    if val is not None:
        extra["val_acc"] = accuracy(model, val[0].to(args.device), val[1].to(args.device))[0]
    if getattr(args, "label_noise", 0):
        extra.update(label_noise=args.label_noise, label_noise_seed=args.label_noise_seed)
    return dict(name=setting["name"], method=setting["method"], rho=setting["rho"], k=setting["k"],
                probe_every=setting["probe_every"] or (steps_per_epoch if setting["method"] == "xsam" else 0),
                sharpness_every=setting.get("sharpness_every", 1), reuse=setting.get("reuse", False),
                seed=seed, test_acc=test_acc, test_loss=test_loss, train_acc=train_acc, train_loss=train_loss,
                epoch_train_losses=train_losses, seconds_per_epoch=statistics.mean(epoch_seconds),
                mean_psi=statistics.mean(psis) if psis else None, alphas=alphas,
                mean_alpha=statistics.mean(alphas) if alphas else None,
                mean_correction=torch.stack(corrections).mean().item() if corrections else None, **extra)


# ---------------------------------------------------------------------- flags
def add_task_flags(p: argparse.ArgumentParser) -> None:
    """The task's flags: data, model, SGD's settings, augmentation, device; `check_task_args` checks them."""
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(INSTALL_HINT))
    p.add_argument("--data_dir", default=None, help=f"default for fashion_mnist: {FASHION_DIR}")
    p.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    p.add_argument("--width", type=int, default=None, help="base width (default: 12 for cnn, 64 for resnet18)")
    p.add_argument("--train_size", type=int, default=600, help="a fixed random subset (same for every seed); 0 = all")
    p.add_argument("--val_size", type=int, default=0,
                   help="a clean validation set held out of the rest of the training pool (0 = none)")
    p.add_argument("--label_noise", type=float, default=0.0,
                   help="fraction in [0, 1) of the training subset relabelled uniformly to another class")
    p.add_argument("--label_noise_seed", type=int, default=0, help="seed of the label noise, apart from --seeds")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=1e-3)
    p.add_argument("--pad", type=int, default=None, help="random-crop padding (default: 2 for 28x28, 4 for 32x32)")
    p.add_argument("--flip", action="store_true",
                   help="random horizontal flip too (CIFAR; off for Fashion-MNIST, whose shoes all face one way)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def check_task_args(args) -> None:
    """Refuse bad task flags by name; fill in the width's default."""
    for flag in ("train_size", "val_size", "epochs", "batch_size", "threads"):
        low = 0 if flag in ("train_size", "val_size") else 1
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag}={getattr(args, flag)} is invalid: must be >= {low}")
    if args.label_noise:
        harness.example("_common").check_label_noise(args.label_noise)
    args.width = args.width or (12 if args.model == "cnn" else 64)
