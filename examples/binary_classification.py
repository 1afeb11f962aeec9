"""The binary-classification example of §4.2 of the article symgrad grew from, derived by symgrad.

The article: 《从零开始大模型开发与微调：链式求导法则》 ("Developing and fine-tuning large
models from scratch: the chain rule"; not part of this repository).  Its §4.2 works the chain
rule through binary cross-entropy; its §5 fine-tunes a pretrained BERT on text, which is
``symgrad finetune``.

A linear layer ``z = f_θ(x) = w·x + b``, ``p = σ(z)``, binary cross-entropy
``L = -y log p - (1 - y) log(1 - p)``.  The chain rule gives

    ∂L/∂z = ∂L/∂p · ∂p/∂z = (-y/p + (1-y)/(1-p)) · p(1-p) = p - y,

and symgrad derives exactly that — then trains the model with gradient descent on a real binary
data set (scikit-learn's breast-cancer data, shipped inside scikit-learn).

Run:  python examples/binary_classification.py
"""

import numpy as np
import sympy as sp
from sklearn.datasets import load_breast_cancer

import symgrad as sg
from symgrad import nn, optim
from symgrad.train import fit

z, y, p = sp.symbols("z y p", real=True)
loss = -y * sp.log(p) - (1 - y) * sp.log(1 - p)
sigmoid = 1 / (1 + sp.exp(-z))

# The two local factors of the chain rule, each by sympy.diff ...
dl_dp = sp.diff(loss, p)
dp_dz = sp.simplify(sp.diff(sigmoid, z).subs(sp.exp(-z), (1 - p) / p))
print("∂L/∂p =", dl_dp)
print("∂p/∂z =", sp.factor(dp_dz))
print("product simplified:", sp.simplify(dl_dp * dp_dz))

# ... and the fused op symgrad compiles: the loss written on σ(z), differentiated as one formula.
bce = sg.elementwise(loss.subs(p, sigmoid), inputs=[z, y], name="article_bce")
print("symgrad derives ∂L/∂z =", bce.derivation().partials[0].final)

data = load_breast_cancer()
x = (data.data - data.data.mean(0)) / data.data.std(0)
labels = data.target.astype(np.float64)[:, None]
rng = np.random.default_rng(0)
order = rng.permutation(len(x))
train, test = order[:400], order[400:]

model = nn.Sequential(nn.Linear(x.shape[1], 1, dtype=np.float64, rng=rng), nn.Sigmoid())
history = fit(
    model,
    nn.BCELoss(),
    optim.SGD(model.parameters(), lr=0.1),
    x[train],
    labels[train],
    epochs=20,
    batch_size=32,
    seed=0,
)
accuracy = np.mean((model(x[test]) > 0.5) == (labels[test] > 0.5))
print(
    f"loss {history.epoch_losses[0]:.4f} → {history.epoch_losses[-1]:.4f}; "
    f"held-out accuracy {100 * accuracy:.1f}%"
)
