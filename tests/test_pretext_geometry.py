"""Pseudo-label generators of the geometric pretext tasks (src/nn/patches.py), checked exactly, and the three
methods built on them (rotation, relative_patch, jigsaw): config rules, the jigsaw permutation set in
checkpoints and the run folder, and pretext accuracy above chance after a short CPU run on Fashion-MNIST."""

import itertools
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

import src.nn.patches as patches
from src.config.compose import compose
from src.config.rules import config_problems
from src.nn.patches import (
    MIN_PATCH,
    all_rotations,
    drop_colour,
    grid_geometry,
    grid_patches,
    hamming_permutations,
    invert,
    normalize_patches,
    permute,
    rotate,
    smallest_size,
)
from src.utils.errors import UserError
from tests.helpers import tiny_cfg

torch.set_num_threads(2)


# ---- rotations --------------------------------------------------------------------------------------------
def test_rotate_matches_rot90_per_sample_and_rotating_back_recovers_the_input():
    x = torch.randn(8, 3, 5, 5)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    y = rotate(x, k)
    for i in range(8):
        assert torch.equal(y[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    assert torch.equal(rotate(y, -k), x) and torch.equal(rotate(y, 4 - k), x)
    assert torch.equal(rotate(x, k + 4), y)  # k is taken mod 4
    assert torch.equal(y[1, 0, 0, 0], x[1, 0, 0, -1])  # 90 degrees counter-clockwise: the top-right pixel goes top-left


def test_all_rotations_holds_every_image_in_every_rotation_with_its_label():
    x = torch.randn(3, 1, 4, 4)
    images, labels = all_rotations(x)
    assert images.shape == (12, 1, 4, 4) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for j in range(12):
        assert torch.equal(images[j], torch.rot90(x[j % 3], int(labels[j]), dims=(-2, -1)))
    assert torch.equal(rotate(images, -labels), x.repeat(4, 1, 1, 1))


def test_rotations_need_square_images():
    with pytest.raises(ValueError, match="square"):
        all_rotations(torch.zeros(1, 1, 4, 5))


# ---- patch grids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,gap,jitter", [(28, 2, 1), (32, 2, 1), (16, 1, 0), (31, 4, 2), (18, 2, 1)])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_tile_is_the_image_slice_it_claims_inside_its_cell(size, gap, jitter, channels):
    torch.manual_seed(0)
    B = 6
    x = torch.randn(B, channels, size, size)
    tiles, corners = grid_patches(x, 3, gap, jitter)
    cell, p, offset = grid_geometry(size, 3, gap, jitter)
    assert (cell, p, offset) == (size // 3, size // 3 - gap, gap // 2)
    assert tiles.shape == (B, 9, channels, p, p) and corners.shape == (B, 9, 2)
    for b, t in itertools.product(range(B), range(9)):
        (r, c), (i, j) = corners[b, t].tolist(), divmod(t, 3)  # row-major: tile t is cell (i, j)
        assert torch.equal(tiles[b, t], x[b, :, r:r + p, c:c + p])
        assert i * cell <= r and r + p <= (i + 1) * cell and j * cell <= c and c + p <= (j + 1) * cell
        assert abs(r - (i * cell + offset)) <= jitter and abs(c - (j * cell + offset)) <= jitter
    grid = corners.view(B, 3, 3, 2)
    assert ((grid[:, 1:, :, 0] - grid[:, :-1, :, 0] - p) >= gap - 2 * jitter).all()  # vertical neighbours
    assert ((grid[:, :, 1:, 1] - grid[:, :, :-1, 1] - p) >= gap - 2 * jitter).all()  # horizontal neighbours
    if jitter:  # the jitter is drawn per sample and per tile, and reaches both ends of its range
        assert len({tuple(c.flatten().tolist()) for c in corners}) == B
        nominal = torch.arange(3) * cell + offset
        shift = grid[..., 0] - nominal.view(1, 3, 1)
        assert shift.min() == -jitter and shift.max() == jitter


def test_smallest_size_is_the_smallest_crop_that_holds_the_grid():
    for gap, jitter in [(0, 0), (1, 0), (2, 1), (4, 2), (5, 1)]:
        n = smallest_size(3, gap, jitter, MIN_PATCH)
        assert n == 3 * (MIN_PATCH + gap)
        assert grid_geometry(n, 3, gap, jitter).patch == MIN_PATCH
        with pytest.raises(ValueError, match=f"at least {n} px"):
            grid_geometry(n - 1, 3, gap, jitter)
    assert smallest_size(3, 1, 0) == 15 and grid_geometry(16, 3, 1, 0) == (5, 4, 0)  # tiny_cfg's 16 px crop
    with pytest.raises(ValueError, match="leave their cells"):
        grid_geometry(32, 3, gap=2, jitter=2)


def test_normalized_patches_have_zero_mean_and_unit_std_and_flat_ones_become_zero():
    p = 3.0 + 5.0 * torch.randn(4, 9, 3, 7, 7)
    p[0, 0] = 2.0  # a flat patch
    q = normalize_patches(p)
    torch.testing.assert_close(q.mean(dim=(-2, -1)), torch.zeros(4, 9, 3), atol=1e-5, rtol=0)
    std = q.std(dim=(-2, -1), unbiased=False)
    torch.testing.assert_close(std[1:], torch.ones(3, 9, 3), atol=1e-5, rtol=0)
    assert torch.equal(q[0, 0], torch.zeros(3, 7, 7))


def test_drop_colour_keeps_exactly_one_original_channel_per_patch():
    torch.manual_seed(0)
    p = torch.randn(64, 2, 3, 6, 6)
    q = drop_colour(p, noise_std=0.01)
    same = (q == p).all(dim=(-2, -1))  # 64 x 2 x 3
    assert (same.sum(dim=-1) == 1).all()
    assert set(same.nonzero()[:, -1].tolist()) == {0, 1, 2}  # the kept channel is drawn per patch
    noise = q[~same]
    assert 0.005 < float(noise.std()) < 0.02 and noise.abs().max() < 0.1
    gray = torch.randn(5, 9, 1, 6, 6)
    assert torch.equal(drop_colour(gray), gray)


# ---- permutations -------------------------------------------------------------------------------------------
def test_permute_then_invert_recovers_the_tiles():
    torch.manual_seed(0)
    tiles = torch.randn(5, 9, 2, 3, 3)
    perm = torch.stack([torch.randperm(9) for _ in range(5)])
    shuffled = permute(tiles, perm)
    for b, i in itertools.product(range(5), range(9)):
        assert torch.equal(shuffled[b, i], tiles[b, perm[b, i]])
    assert torch.equal(permute(shuffled, invert(perm)), tiles)
    assert torch.equal(permute(permute(tiles, invert(perm)), perm), tiles)


def min_distance(perms: torch.Tensor) -> int:
    d = (perms[:, None] != perms[None]).sum(-1)
    return int(d[~torch.eye(len(perms), dtype=torch.bool)].min())


def test_hamming_set_is_deterministic_distinct_and_of_the_requested_size():
    a = hamming_permutations(100, 9, seed=0)
    assert a.shape == (100, 9) and a.dtype == torch.long
    assert torch.equal(a, torch.from_numpy(patches._hamming_set.__wrapped__(100, 9, 0)))  # recomputed, not cached
    assert torch.equal(a.sort(dim=1).values, torch.arange(9).expand(100, 9))  # every row is a permutation
    assert len({tuple(r) for r in a.tolist()}) == 100
    assert torch.equal(hamming_permutations(10), a[:10])  # greedy: a longer set extends a shorter one
    assert not torch.equal(hamming_permutations(100, 9, seed=1), a)
    a[0] = 0
    assert not torch.equal(hamming_permutations(100, 9, seed=0), a), "callers must get a copy of the cached set"


def test_hamming_set_reaches_the_best_minimum_distance_for_ten_permutations():
    # 9 permutations can differ in every position (the rows of a Latin square) and greedy finds them;
    # among 10, two share the tile at position 0 (pigeonhole), so 8 is the best possible minimum distance.
    assert min_distance(hamming_permutations(9, rule="min")) == 9
    assert min_distance(hamming_permutations(10, rule="min")) == 8
    assert min_distance(hamming_permutations(1000, rule="min")) >= 5  # measured: 5 (mean distance 7.9)


def test_hamming_set_is_the_greedy_max_min_distance_choice():
    """A naive re-implementation on 4 tiles (24 permutations, lexicographic order, ties to the lowest index)."""
    perms = list(itertools.permutations(range(4)))
    start = patches._all_permutations(4).tolist().index(hamming_permutations(1, 4, seed=5)[0].tolist())
    chosen = [start]
    for _ in range(11):
        dist = [min(sum(a != b for a, b in zip(p, perms[c], strict=True)) for c in chosen) for p in perms]
        chosen.append(max(range(len(perms)), key=lambda i: (dist[i], -i)))
    assert hamming_permutations(12, 4, seed=5, rule="min").tolist() == [list(perms[i]) for i in chosen]


def test_hamming_set_is_the_papers_algorithm_1_by_default():
    """Noroozi & Favaro's Algorithm 1: D-bar = 1^T D, the summed Hamming distance of every remaining permutation to
    the chosen ones; the next one is its argmax (naive re-implementation on 4 tiles, ties to the lowest index)."""
    perms = list(itertools.permutations(range(4)))
    start = patches._all_permutations(4).tolist().index(hamming_permutations(1, 4, seed=5)[0].tolist())
    chosen = [start]
    for _ in range(15):
        rest = [i for i in range(len(perms)) if i not in chosen]
        total = {i: sum(sum(a != b for a, b in zip(perms[i], perms[c], strict=True)) for c in chosen) for i in rest}
        chosen.append(max(rest, key=lambda i: (total[i], -i)))
    assert hamming_permutations(16, 4, seed=5).tolist() == [list(perms[i]) for i in chosen]
    assert hamming_permutations(16, 4, seed=5).tolist() != hamming_permutations(16, 4, seed=5, rule="min").tolist()
    with pytest.raises(ValueError, match="rule"):
        hamming_permutations(4, 4, rule="max")


def test_hamming_set_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        hamming_permutations(25, 4)
    with pytest.raises(ValueError):
        hamming_permutations(10, 12)


# ---- the methods ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("relative_patch", "RelativePatch"), ("jigsaw", "Jigsaw")])
def test_a_crop_too_small_for_the_grid_is_one_line_naming_the_smallest_size(name, cls):
    assert config_problems(compose([f"method={name}", "data=fashion_mnist"])) == []
    assert config_problems(compose([f"method={name}", "data=cifar10"])) == []
    assert config_problems(compose([f"method={name}", "data.crop_size=18"])) == []  # 3 x (4 + 2)
    problems = config_problems(compose([f"method={name}", "data.crop_size=16"]))
    assert problems == [f"{cls} needs views.crops[0].size >= 18 for a 3x3 grid with gap 2 and jitter 1 (patches of "
                        "at least 4 px); got 16: raise data.crop_size/views.crops[0].size or lower method.gap"]
    assert config_problems(compose([f"method={name}", "data.crop_size=16", "method.gap=1", "method.jitter=0"])) == []
    problems = config_problems(compose([f"method={name}", "method.jitter=2"]))
    assert len(problems) == 1 and problems[0].startswith("method.jitter=2 is more than method.gap // 2 = 1")


def test_constructor_arguments_are_checked():
    cfg = tiny_cfg("jigsaw", "method.gap=1", "method.jitter=0")
    parts = dict(backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    jigsaw = instantiate(cfg.method, _partial_=True, **parts)  # called below, so UserError is not wrapped by Hydra
    for key, value in [("num_permutations", 1), ("num_permutations", 362881), ("jitter", 1), ("gap", -1),
                       ("head_layers", 0)]:
        with pytest.raises(UserError, match=f"method.{key}={value}"):
            jigsaw(**{key: value})
    with pytest.raises(UserError, match="method.jitter=2"):
        instantiate(tiny_cfg("relative_patch").method, _partial_=True, **parts)(gap=2, jitter=2)
    problems = config_problems(compose(["method=jigsaw", "method.num_permutations=1"]))
    assert len(problems) == 1 and problems[0].startswith("method.num_permutations=1 must be in [2, 362880]")


def jigsaw_cfg(*overrides):
    return tiny_cfg("jigsaw", "method.gap=1", "method.jitter=0", "method.num_permutations=10", *overrides)


def test_jigsaw_permutations_are_saved_in_the_state_dict_and_the_run_folder(tmp_path, monkeypatch):
    cfg = jigsaw_cfg("method.permutation_seed=3")
    L.seed_everything(0)
    dm = instantiate(cfg.data)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    assert torch.equal(method.permutations, hamming_permutations(10, 9, seed=3))
    fresh = instantiate(jigsaw_cfg().method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    assert not torch.equal(fresh.permutations, method.permutations)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.permutations, method.permutations)

    run_dir = tmp_path / "run"
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(method, datamodule=dm)
    lines = (run_dir / "jigsaw_permutations.txt").read_text().splitlines()
    assert [[int(v) for v in line.split()] for line in lines] == method.permutations.tolist()

    monkeypatch.chdir(tmp_path / "run")  # a Trainer without default_root_dir leaves the working directory alone
    os.remove("jigsaw_permutations.txt")
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(method, datamodule=dm)
    assert not os.path.exists("jigsaw_permutations.txt")


def backbone_inputs_and_labels(method, x, monkeypatch):
    """What the backbone sees and which labels the loss gets in one call of ``method.training_loss([x])``."""
    seen, labels = [], []
    method.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, y: (labels.append(y), cross_entropy(logits, y))[1])
    loss, logs = method.training_loss([x])
    assert torch.isfinite(loss) and 0 <= float(logs["pretext_acc"]) <= 1
    return seen[0], labels[0]


def fixed_grid(x):
    """The 3x3 tiles of 16-px images with gap 1 and jitter 0 (4-px tiles at 0, 5, 10), by unfold: B x 9 x C x 4 x 4."""
    return x.unfold(2, 4, 5).unfold(3, 4, 5).permute(0, 2, 3, 1, 4, 5).flatten(1, 2)


def test_relative_patch_pairs_the_centre_with_the_labelled_neighbour(monkeypatch):
    cfg = tiny_cfg("relative_patch", "method.gap=1", "method.jitter=0")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views), color_drop=False)
    x = torch.randn(8, 3, 16, 16)
    inputs, label = backbone_inputs_and_labels(method, x, monkeypatch)
    tiles = normalize_patches(fixed_grid(x))
    assert inputs.shape == (16, 3, 4, 4) and label.shape == (8,) and 0 <= label.min() and label.max() < 8
    pairs = inputs.view(8, 2, 3, 4, 4)  # centre first, then the neighbour: class c is tile c, skipping the centre 4
    torch.testing.assert_close(pairs[:, 0], tiles[:, 4])
    torch.testing.assert_close(pairs[:, 1], tiles[torch.arange(8), label + (label >= 4).long()])


def test_jigsaw_feeds_the_tiles_in_the_order_of_the_labelled_permutation(monkeypatch):
    cfg = jigsaw_cfg()
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    x = torch.randn(8, 3, 16, 16)
    inputs, label = backbone_inputs_and_labels(method, x, monkeypatch)
    tiles = normalize_patches(fixed_grid(x))
    assert inputs.shape == (72, 3, 4, 4) and label.shape == (8,)
    shuffled = inputs.view(8, 9, 3, 4, 4)
    for b in range(8):  # position i holds tile perm[i] of the permutation named by the label
        torch.testing.assert_close(shuffled[b], tiles[b, method.permutations[label[b]]])


@pytest.mark.parametrize("single,images", [(False, 32), (True, 8)])
def test_rotation_sees_all_four_rotations_or_one_per_image(single, images, monkeypatch):
    cfg = tiny_cfg("rotation", f"method.single_rotation={single}")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    x = torch.randn(8, 3, 16, 16)
    inputs, label = backbone_inputs_and_labels(method, x, monkeypatch)
    assert inputs.shape == (images, 3, 16, 16) and label.shape == (images,)
    torch.testing.assert_close(rotate(inputs, -label), x.repeat(images // 8, 1, 1, 1))


def pretext_accuracy(name: str, steps: int, batch: int, *overrides: str) -> float:
    """Pretext accuracy on 512 held-out Fashion-MNIST images (eval mode, fresh views and labels) after
    ``steps`` SGD steps of ``batch`` images out of 512 training images with a small convnet."""
    cfg = compose([f"method={name}", "data=fashion_mnist", "data.max_train_samples=512", f"data.batch_size={batch}",
                   "backbone=convnet", "backbone.width=8", "backbone.depth=3", "backbone.pool_grid=1", "logger=none",
                   "eval=none", "method.warmup_epochs=0", "method.lr_scaling=none", *overrides])
    L.seed_everything(0)
    dm = instantiate(cfg.data)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(method, datamodule=dm)
    images = torch.stack([dm.eval_val[i][0] for i in range(512)])
    method.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        return float(method.training_loss(method.views(images))[1]["pretext_acc"])


# Chance: 1/4, 1/8, 1/10. Measured (seed 0, global average pool): 0.44, 0.28, 0.86; with the labels shuffled
# during training (a broken label generator) 0.23, 0.15, 0.13, so each threshold sits well between the two.
# (Fashion-MNIST's fitted 4x4 pool grid gives relative_patch 0.21: its patches' maps are smaller than the grid.)
# Rotation sees four images per image, hence its smaller batch.
@pytest.mark.parametrize("name,batch,overrides,threshold", [
    ("rotation", 32, [], 0.33),
    ("relative_patch", 64, [], 0.22),
    ("jigsaw", 64, ["method.num_permutations=10"], 0.4),
])
def test_pretext_accuracy_is_clearly_above_chance_after_a_short_run(name, batch, overrides, threshold):
    assert pretext_accuracy(name, 40, batch, *overrides) > threshold
