"""``protocol=plot``: a 2-D map of the evaluation split's frozen features, coloured by class.

t-SNE (scikit-learn, PCA initialisation, seeded) or UMAP (the optional ``umap-learn`` package, ``pip install
'.[umap]'``) of at most ``max_items`` evenly spaced images. The picture follows the project's rule (the run's
``pictures/<what>_<epoch>.png`` during training, ``<checkpoint stem>.<what>.png`` beside a checkpoint, and W&B); the
figure reported is scikit-learn's trustworthiness of the map (how well it keeps each point's
``neighbours`` nearest neighbours, 1 = all kept).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from src.protocols import Protocol, Subject
from src.utils.errors import UserError

METHODS = ("tsne", "umap")


def embed_2d(x: np.ndarray, method: str, seed: int, perplexity: float) -> np.ndarray:
    """(N, D) features -> (N, 2) map."""
    if method == "umap":
        try:
            import umap
        except ImportError as e:
            raise UserError("protocols.plot.method=umap needs the umap-learn package: pip install '.[umap]' (or use "
                            "method=tsne)") from e
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(1.0, (x.shape[0] - 1) / 3))  # t-SNE needs perplexity < N
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def scatter(points: np.ndarray, labels: np.ndarray, names: list[str], title: str) -> torch.Tensor:
    """The map as an image (3, H, W) float in [0, 1]: one colour per class, a legend with the class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(c % cmap.N), label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255


def class_names(subject: Subject) -> list[str]:
    dm = subject.datamodule
    names = getattr(dm, "zeroshot_class_names", None)
    try:
        found = names() if callable(names) else None
    except Exception:  # noqa: BLE001 - names are a nicety; numbers will do
        found = None
    return list(found) if found and len(found) == subject.num_classes else [str(c) for c in range(subject.num_classes)]


class Plot(Protocol):
    name = "plot"

    def __init__(self, method: str = "tsne", max_items: int = 2000, perplexity: float = 30.0, neighbours: int = 5):
        if method not in METHODS:
            raise ValueError(f"protocols.plot.method={method!r}; allowed: {', '.join(METHODS)}")
        if max_items < 10:
            raise ValueError(f"protocols.plot.max_items={max_items} must be >= 10")
        self.method, self.max_items, self.perplexity, self.neighbours = method, int(max_items), float(perplexity), int(neighbours)

    @property
    def tag(self) -> str:
        return self.method

    def run(self, subject: Subject) -> dict:
        from sklearn.manifold import trustworthiness

        x, y = subject.features("val", self.max_items)
        x = F.normalize(x.double(), dim=1).numpy()
        points = embed_2d(x, self.method, subject.seed, self.perplexity)
        trust = float(trustworthiness(x, points, n_neighbors=min(self.neighbours, (x.shape[0] - 1) // 2)))
        what = self.method if subject.name == "trained" else f"{subject.name}_{self.method}"
        title = (f"{self.method} of {x.shape[0]} {subject.datamodule.eval_split_names[1]} images, {subject.name} "
                 f"model (trustworthiness {trust:.3f})")
        image = scatter(points, y.numpy(), class_names(subject), title)
        out = {f"{self.method}_trustworthiness": round(trust, 4)}
        if (path := subject.show(what, image, title)) is not None:
            out[f"{self.method}_picture"] = str(path)
        return out
