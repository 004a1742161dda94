"""A plain-PyTorch XSAM run: an MLP with BatchNorm and dropout on scikit-learn's digits, SGD vs SAM vs XSAM.

    python examples/xsam_demo.py
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from hf_xsam import XSAM


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def run(name: str, epochs: int, seed: int, x_train, y_train, x_test, y_test) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = make_model()
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    if name == "sgd":
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.0, **sgd)
    elif name == "sam":
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.15, alpha=1.0, probe_every=0, **sgd)
    else:
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.15, probe_every=10, **sgd)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(64):
            xb, yb = x_train[idx], y_train[idx]

            def closure(backward=True, xb=xb, yb=yb):
                loss = nn.functional.cross_entropy(model(xb), yb)
                if backward:
                    loss.backward()
                return loss

            opt.step(closure)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return acc, opt.alpha, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    print(f"{'optimizer':<10}{'test acc':>10}{'alpha':>8}{'seconds':>9}")
    for name in ("sgd", "sam", "xsam"):
        acc, alpha, seconds = run(name, args.epochs, args.seed, x[train], y[train], x[test], y[test])
        print(f"{name:<10}{acc:>10.4f}{alpha:>8.2f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
