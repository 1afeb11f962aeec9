"""The sweep behind the digits task's protocol (benchmarks/RESULTS-digits.md): accuracy on the
held-out scikit-learn digits of the MNIST-pretrained MLP (untouched, head kept, new head) and of
the same MLP from scratch, for k labelled digits per class and several seeds — symgrad alone,
the task's phases and hyperparameters.

Run:  python benchmarks/sweep_digits.py [--k 1 3 5 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import numpy as np

from symgrad import nn
from symgrad.tasks import finetune as ft
from symgrad.tasks.digits import few_shot_split, load_mnist_8x8, load_sklearn_digits
from symgrad.train import accuracy, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    cfg = ft.FinetuneConfig()
    mnist_x, mnist_y = load_mnist_8x8()
    digits_x, digits_y = load_sklearn_digits()
    mnist_x, digits_x = mnist_x / 16.0, digits_x / 16.0
    dtype = np.dtype(cfg.dtype)
    print("seed k  untouched  kept  new  scratch  (% of the held-out digits)")
    for seed in args.seeds:
        pre = ft.make_mlp(dtype, np.random.default_rng(seed))
        opt = ft.make_optimizer(cfg.optimizer, pre.parameters())
        fit(
            pre,
            nn.CrossEntropyLoss(),
            opt,
            mnist_x,
            mnist_y,
            epochs=cfg.pretrain_epochs,
            batch_size=cfg.batch_size,
            seed=seed,
        )
        snapshot = pre.state_dict()
        for k in args.k:
            train, test = few_shot_split(digits_y, k, cfg.test_fraction, seed)
            row = {"untouched": accuracy(pre, digits_x[test], digits_y[test])}
            for way in ("kept", "new", "scratch"):
                rng = np.random.default_rng([seed, k])
                model = ft.make_mlp(dtype, rng)
                if way != "scratch":
                    model.load_state_dict(snapshot)
                if way == "new":
                    body = [model[n] for n in range(len(model) - 1)]
                    model = nn.Sequential(*body, nn.Linear(64, 10, dtype=dtype, rng=rng))
                opt = ft.make_optimizer(cfg.optimizer, model.parameters())
                fit(
                    model,
                    nn.CrossEntropyLoss(),
                    opt,
                    digits_x[train],
                    digits_y[train],
                    epochs=cfg.epochs,
                    batch_size=len(train),
                    seed=seed,
                )
                row[way] = accuracy(model, digits_x[test], digits_y[test])
            print(
                f"{seed:>4} {k:<2} " + "  ".join(f"{100 * v:5.1f}" for v in row.values()),
                flush=True,
            )


if __name__ == "__main__":
    main()
