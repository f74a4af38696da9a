"""Linear probe on cached frozen features.

Protocol: features are standardised with the training mean/std, then a single ``nn.Linear`` is fitted by
multinomial logistic regression (softmax cross-entropy + L2 penalty ``weight_decay / 2 * ||W||^2`` on the
weights, not the bias) with full-batch L-BFGS (strong-Wolfe line search), as in scikit-learn's
``LogisticRegression``. The problem is strongly convex, so this converges to the same optimum whatever the
number of samples or the feature scale; mini-batch AdamW with a fixed epoch budget under-fits small feature
sets (a few hundred samples give a handful of steps) and needs the learning rate tuned per dataset.

``epochs`` is the maximum number of L-BFGS iterations (each is one or a few full passes over the features);
``batch_size`` only chunks each full pass to bound memory (gradients are accumulated over chunks, so the
result does not depend on it). The weights start at zero and there is no shuffling, so the result is
deterministic and the global RNG is untouched; ``seed`` is accepted for interface stability only.
Everything runs on the device of ``train_x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.nn.metrics import accuracy


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-3,
    batch_size: int = 65536,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a linear classifier on ``train_x`` (N, D) and return ``{"top1", "top5"}`` (percent) on ``val_x``."""
    del seed  # deterministic: zero init, full batch
    device = train_x.device
    x = train_x.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_y.to(device=device, dtype=torch.long)
    n = x.shape[0]

    probe = nn.utils.skip_init(nn.Linear, x.shape[1], num_classes, device=device)  # no global RNG use
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(
        probe.parameters(), lr=lr, max_iter=epochs, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device)
        for i in range(0, n, batch_size):
            loss = F.cross_entropy(probe(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = 0.5 * weight_decay * probe.weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    with torch.enable_grad():
        opt.step(closure)

    vx = (val_x.to(device).float() - mean) / std
    vy = val_y.to(device=device, dtype=torch.long)
    with torch.no_grad():
        logits = torch.cat(
            [probe(vx[i : i + batch_size]) for i in range(0, vx.shape[0], batch_size)]
            or [vx.new_zeros(0, num_classes)]
        )
    return {"top1": accuracy(logits, vy, num_classes, 1), "top5": accuracy(logits, vy, num_classes, 5)}
