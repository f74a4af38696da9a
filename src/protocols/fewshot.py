"""``protocol=fewshot``: N-shot classification on frozen features, averaged over episodes.

Each episode draws N labelled images per class from the train split's features (at most ``max_train_items``
evenly spaced images form the pool), fits scikit-learn's multinomial logistic regression on the L2-normalised
features (inverse regularisation ``C``) and measures top-1 on the whole evaluation split. Reported per N: the mean
over ``episodes`` and the half-width of its ``confidence`` interval, ``t * s / sqrt(episodes)`` with ``s`` the
episodes' sample standard deviation and ``t`` Student's quantile with ``episodes - 1`` degrees of freedom
(``fewshot_<N>shot_top1`` and ``fewshot_<N>shot_ci``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.linear_model import LogisticRegression

from src.nn.metrics import accuracy
from src.protocols import Protocol, Subject, percent


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t ``confidence`` interval of the mean) of ``values`` (at least two)."""
    n = len(values)
    if n < 2:
        raise ValueError("a confidence interval needs at least 2 episodes")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)


def episode(labels: torch.Tensor, shots: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``shots`` samples of each class in ``labels`` (classes >= 0), drawn with ``generator``."""
    picks = []
    for c in sorted(int(c) for c in labels.unique() if c >= 0):
        members = (labels == c).nonzero().flatten()
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.cat(picks)


class FewShot(Protocol):
    name = "fewshot"

    def __init__(self, shots: list[int] = (1, 5, 10, 100), episodes: int = 10, C: float = 1.0,
                 confidence: float = 0.95, max_train_items: int | None = 10000, max_val_items: int | None = None):
        shots = sorted({int(n) for n in shots})
        if not shots or shots[0] < 1:
            raise ValueError(f"protocols.fewshot.shots={shots}: give one or more N >= 1, e.g. [1, 5, 10, 100]")
        if episodes < 2:
            raise ValueError(f"protocols.fewshot.episodes={episodes}: a confidence interval needs at least 2")
        if not 0 < confidence < 1 or C <= 0:
            raise ValueError(f"protocols.fewshot: confidence={confidence} must be in (0, 1) and C={C} > 0")
        self.shots, self.episodes, self.C, self.confidence = shots, int(episodes), float(C), float(confidence)
        self.max_train_items, self.max_val_items = max_train_items, max_val_items

    def run(self, subject: Subject) -> dict:
        tx, ty = subject.features("train", self.max_train_items)
        vx, vy = subject.features("val", self.max_val_items)
        tx, vx = F.normalize(tx.double(), dim=1).numpy(), F.normalize(vx.double(), dim=1).numpy()
        counts = torch.bincount(ty[ty >= 0])
        fewest = int(counts[counts > 0].min())
        out = {}
        for n in self.shots:
            if n > fewest:
                subject.say(f"fewshot: {n}-shot skipped, a class has only {fewest} images in the pool "
                            "(raise protocols.fewshot.max_train_items)")
                continue
            g = torch.Generator().manual_seed(subject.seed * 1_000_003 + n)
            accs = []
            for _ in range(self.episodes):
                idx = episode(ty, n, g).numpy()
                clf = LogisticRegression(C=self.C, max_iter=1000).fit(tx[idx], ty.numpy()[idx])
                pred = torch.from_numpy(clf.predict(vx)).long()
                accs.append(accuracy(pred, vy, subject.num_classes))
            mean, half = mean_interval(accs, self.confidence)
            out[f"fewshot_{n}shot_top1"], out[f"fewshot_{n}shot_ci"] = percent(mean), percent(half)
        return out
