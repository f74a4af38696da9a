"""Dense pretext tasks (context encoder, colorization, split-brain): Lab colour against an independent
reference and published values, the ab quantisation, soft encoding, class rebalancing, masks, decoders,
and the methods' rules (colour data only, pictures, features, the prior buffer)."""

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from src.config.compose import compose
from src.config.rules import config_problems
from src.nn.color import (
    ab_gamut_bins,
    annealed_mean,
    l_bins,
    l_encode,
    lab_to_rgb,
    rebalance_weights,
    rgb_to_lab,
    smooth_prior,
    soft_encode,
)
from src.nn.decoders import DenseClassifier, ImageDecoder, feature_map_size
from src.nn.masks import center_mask, overlap_weights, random_block_masks, shrink
from tests.helpers import tiny_cfg

CORNERS = [(r, g, b) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)]


def as_image(colours) -> torch.Tensor:
    """A list of (r, g, b) as a 1 x 3 x N x 1 image."""
    return torch.tensor(colours, dtype=torch.float64).T.reshape(1, 3, -1, 1)


def naive_lab(r: float, g: float, b: float) -> tuple[float, float, float]:
    """sRGB -> CIE Lab of one colour, straight from the CIE / IEC 61966-2-1 formulas (D65, 2 degrees)."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else math.pow((c + 0.055) / 1.055, 2.4)

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = 0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl
    y = 0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl
    z = 0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl

    def f(t):
        d = 6 / 29
        return t ** (1 / 3) if t > d**3 else t / (3 * d * d) + 4 / 29

    fx, fy, fz = f(x / 0.95047), f(y / 1.0), f(z / 1.08883)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


# ---- Lab ---------------------------------------------------------------------------------------------
def test_lab_round_trip_within_1e_4():
    torch.manual_seed(0)
    rgb = torch.cat([torch.rand(4, 3, 8, 8), as_image(CORNERS).float().reshape(1, 3, 8, 1).expand(4, 3, 8, 8)], 2)
    back = lab_to_rgb(rgb_to_lab(rgb))
    assert back.dtype == torch.float32 and back.shape == rgb.shape
    assert (back - rgb).abs().max() < 1e-4  # stated tolerance: 1e-4 in [0, 1] units, float32


def test_rgb_to_lab_matches_an_independent_per_pixel_reference():
    torch.manual_seed(1)
    colours = torch.rand(200, 3, dtype=torch.float64).tolist() + CORNERS + [(0.02, 0.03, 0.04)]  # dark: linear part
    lab = rgb_to_lab(as_image(colours))[0, :, :, 0].T
    ref = torch.tensor([naive_lab(*c) for c in colours], dtype=torch.float64)
    torch.testing.assert_close(lab, ref, atol=1e-8, rtol=0)
    lab32 = rgb_to_lab(as_image(colours).float())[0, :, :, 0].T  # float32: 1e-3 Lab units
    torch.testing.assert_close(lab32.double(), ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("rgb, lab", [((1, 1, 1), (100, 0, 0)), ((0, 0, 0), (0, 0, 0)),
                                      ((1, 0, 0), (53.24, 80.09, 67.20)), ((0, 1, 0), (87.73, -86.18, 83.18))])
def test_rgb_to_lab_matches_published_values(rgb, lab):
    got = rgb_to_lab(as_image([rgb]).float())[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor(lab, dtype=torch.float32), atol=0.01, rtol=0)


def test_lab_is_float32_under_autocast():
    rgb = torch.rand(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab = rgb_to_lab(rgb.bfloat16())
    assert lab.dtype == torch.float32
    torch.testing.assert_close(lab, rgb_to_lab(rgb.bfloat16().float()))


# ---- ab quantisation ---------------------------------------------------------------------------------
def test_gamut_bins_are_the_262_grid_centres_reached_by_srgb():
    c = ab_gamut_bins()
    assert c.shape == (262, 2) and torch.equal(c, ab_gamut_bins())  # deterministic (Zhang et al.: 313)
    assert torch.equal(c, (c / 10).round() * 10) and c.abs().max() <= 110
    assert (c == 0).all(1).any(), "the grays' bin"
    torch.manual_seed(2)
    ab = rgb_to_lab(torch.rand(1, 3, 64, 64))[0, 1:].reshape(2, -1).T  # every colour lies in a kept bin
    assert (torch.cdist(ab, c, p=float("inf")).min(1).values <= 5 + 1e-4).all()


def test_soft_encoding_sums_to_one_on_exactly_k_nearest_bins():
    c = ab_gamut_bins()
    torch.manual_seed(3)
    ab = rgb_to_lab(torch.rand(2, 3, 5, 5))[:, 1:]
    z = soft_encode(ab, c, k=5, sigma=5.0)
    assert z.shape == (2, len(c), 5, 5)
    torch.testing.assert_close(z.sum(1), torch.ones(2, 5, 5))
    assert ((z > 0).sum(1) == 5).all()
    nearest = torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), c).argmin(1)
    assert torch.equal(z.argmax(1).flatten(), nearest)


def test_annealed_mean_of_a_peaked_distribution_is_its_bin_centre():
    c = ab_gamut_bins()
    logits = torch.zeros(3, len(c), 2, 2)
    for i, q in enumerate([0, 100, 261]):
        logits[i, q] = 50.0
        assert torch.allclose(annealed_mean(logits, c, T=0.38)[i], c[q].view(2, 1, 1).expand(2, 2, 2), atol=1e-4)
    uniform = annealed_mean(torch.zeros(1, len(c), 1, 1), c, T=1.0)[0, :, 0, 0]
    torch.testing.assert_close(uniform, c.mean(0))  # T = 1 on equal logits: the plain mean


def test_rebalancing_weights_have_expectation_one_and_favour_rare_bins():
    c = ab_gamut_bins()
    torch.manual_seed(4)
    counts = torch.randint(0, 1000, (len(c),)) ** 2
    w, p = rebalance_weights(counts, c, lam=0.5, sigma=5.0), smooth_prior(counts, c, 5.0)
    torch.testing.assert_close((p * w).sum(), torch.tensor(1.0))
    order = p.argsort()
    assert (w[order].diff() <= 1e-6).all(), "weights must fall as the smoothed prior rises"
    assert w[p.argmin()] > 1 > w[p.argmax()]
    torch.testing.assert_close(rebalance_weights(torch.ones(len(c)), c), torch.ones(len(c)))
    torch.testing.assert_close(rebalance_weights(torch.zeros(len(c)), c), torch.ones(len(c)))


def test_lightness_bins():
    centres = l_bins(100)
    assert centres.shape == (100, 1) and centres[0, 0] == 0.5 and centres[-1, 0] == 99.5
    assert l_encode(torch.tensor([0.0, 0.99, 50.2, 99.99, 100.0])).tolist() == [0, 0, 50, 99, 99]


# ---- masks -------------------------------------------------------------------------------------------
def test_center_mask_is_the_centred_square():
    m = center_mask(128, 0.5)
    rows, cols = m.nonzero().unbind(1)
    assert m.sum() == 64 * 64 and rows.min() == cols.min() == 32 and rows.max() == cols.max() == 95
    m = center_mask(16, 0.5)
    assert m[4:12, 4:12].all() and m.sum() == 64
    assert center_mask(15, 0.4).sum() == 36 and center_mask(15, 0.4)[4:10, 4:10].all()


def test_random_blocks_are_squares_inside_the_image_and_differ_per_sample():
    torch.manual_seed(5)
    m = random_block_masks(8, 16, num_blocks=1, block_frac=0.25, device="cpu")
    assert m.shape == (8, 16, 16) and m.dtype == torch.bool
    for one in m:
        rows, cols = one.nonzero().unbind(1)
        assert one.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
    assert len({tuple(one.flatten().tolist()) for one in m}) > 1
    many = random_block_masks(8, 16, num_blocks=4, block_frac=0.25)
    assert ((many.sum((1, 2)) >= 16) & (many.sum((1, 2)) <= 64)).all()
    torch.manual_seed(5)
    assert torch.equal(random_block_masks(8, 16, 1, 0.25), m), "torch's global RNG makes them reproducible"


def test_overlap_shrinks_the_seen_hole_and_weighs_its_border():
    hole = center_mask(16, 0.5)  # rows/cols 4..11
    seen = shrink(hole, 2)
    assert seen[6:10, 6:10].all() and seen.sum() == 16
    w = overlap_weights(hole, overlap=2, overlap_weight=10.0)
    assert (w[seen] == 1).all() and (w[hole & ~seen] == 10).all() and (w[~hole] == 0).all()
    assert (hole & ~seen).sum() == 64 - 16  # a 2-px ring
    assert torch.equal(shrink(hole, 0), hole) and torch.equal(overlap_weights(hole, 0), hole.float())
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:4, :4] = True  # the image border does not erode a block
    assert torch.equal(shrink(corner, 1).nonzero().max(0).values, torch.tensor([2, 2])) and shrink(corner, 1)[0, 0]


# ---- decoders ----------------------------------------------------------------------------------------
def test_decoders_give_the_requested_shapes():
    f = torch.randn(2, 16, 4, 4)
    assert DenseClassifier(16, 32, 7)(f).shape == (2, 7, 4, 4)
    assert DenseClassifier(16, 32, 7)(f, size=9).shape == (2, 7, 9, 9)
    assert ImageDecoder(16, 3, 4, 16)(f).shape == (2, 3, 16, 16)
    assert ImageDecoder(16, 1, 4, 28)(f).shape == (2, 1, 28, 28)  # 4 -> 32 -> bilinear 28
    assert ImageDecoder(16, 3, 4, 16)(f, size=20).shape == (2, 3, 20, 20)
    net = instantiate(compose(["backbone=convnet", "backbone.depth=3"]).backbone)
    assert feature_map_size(net, 1, 28) == 7 and net.training


# ---- methods -----------------------------------------------------------------------------------------
def build(name: str, *overrides: str):
    cfg = tiny_cfg(name, *overrides)
    return instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))


def normalised(method, rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - method.views.mean.view(1, -1, 1, 1)) / method.views.std.view(1, -1, 1, 1)


@pytest.mark.parametrize("name", ["colorization", "split_brain"])
def test_colour_methods_stop_on_grayscale_data_with_one_line(name):
    problems = config_problems(compose([f"method={name}", "data=fashion_mnist"]))
    assert len(problems) == 1 and "colour" in problems[0] and "data.channels=1" in problems[0]
    assert config_problems(compose([f"method={name}", "data=cifar10"])) == []


@pytest.mark.parametrize("name, rows", [
    ("inpainting", ["input", "prediction", "target"]),
    ("colorization", ["input (L)", "prediction", "target"]),
    ("split_brain", ["input (L)", "ab from L", "L from ab", "target"]),
])
def test_pictures_are_rows_of_images_in_0_1(name, rows):
    torch.manual_seed(0)
    method = build(name).eval()
    x = normalised(method, torch.rand(3, 3, 16, 16))
    out = method.pictures(x)
    assert list(out) == rows
    for r in out.values():
        assert r.shape == (3, 3, 16, 16) and r.min() >= 0 and r.max() <= 1


def test_inpainting_works_on_grayscale_and_hides_the_hole():
    cfg = compose(["method=inpainting", "data=fashion_mnist", "backbone=convnet", "backbone.width=8",
                   "backbone.depth=2", "method.overlap=2"])
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    x = torch.randn(2, 1, 28, 28)
    x_in, hole, x_hat = method.reconstruct(x)
    seen = shrink(hole, 2)
    assert x_hat.shape == x.shape and hole.sum() == 2 * 14 * 14 and seen.sum() == 2 * 10 * 10
    assert (x_in[seen.expand_as(x)] == 0).all() and torch.equal(x_in[~seen.expand_as(x)], x[~seen.expand_as(x)])
    assert all(r.shape == (2, 1, 28, 28) for r in method.eval().pictures(x).values())
    bad = compose(["method=inpainting", "method.overlap=7"])  # a 14-px hole of a 28-px crop
    assert len(config_problems(bad)) == 1 and "method.overlap=7" in config_problems(bad)[0]


def test_split_brain_has_two_independent_halves():
    torch.manual_seed(0)
    method = build("split_brain").eval()
    d = method.backbone.out_dim
    assert method.feature_dim == 2 * d and method(normalised(method, torch.rand(4, 3, 16, 16))).shape == (4, 2 * d)
    assert method.backbone.features[0].in_channels == 1 and method.ab_backbone.features[0].in_channels == 2
    ab_params = dict(method.ab_backbone.named_parameters())
    pairs = [(p, ab_params[n]) for n, p in method.backbone.named_parameters()
             if p.ndim > 1 and p.shape == ab_params[n].shape]  # every conv but the first
    assert pairs and all(not torch.equal(a, b) for a, b in pairs)
    assert not set(map(id, method.backbone.parameters())) & set(map(id, method.ab_backbone.parameters()))


def test_colorization_prior_counts_training_batches_and_checkpoint():
    cfg = tiny_cfg("colorization")
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    assert method.counts.sum() == 0
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert method.counts.sum() == 2 * 16 * 8 * 8  # 2 batches of 16 at the 8 x 8 feature map's side
    state = method.state_dict()
    assert "counts" in state and "centres" not in state  # the bins are recomputed, the prior is saved
    fresh = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, method.counts)


def test_colorization_features_ignore_the_colour():
    torch.manual_seed(0)
    method = build("colorization").eval()
    lab = torch.cat([torch.rand(2, 1, 16, 16) * 40 + 30, torch.zeros(2, 2, 16, 16)], 1)  # grays, L in [30, 70]
    tinted = lab + torch.tensor([0.0, 12.0, -12.0]).view(1, 3, 1, 1)  # same L, another (in-gamut) colour
    gray, colour = lab_to_rgb(lab), lab_to_rgb(tinted)
    torch.testing.assert_close(rgb_to_lab(colour), tinted, atol=1e-3, rtol=0)  # no clipping: same L indeed
    assert (gray - colour).abs().max() > 0.05
    with torch.no_grad():
        f_gray, f_colour = method(normalised(method, gray)), method(normalised(method, colour))
    torch.testing.assert_close(f_gray, f_colour, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["inpainting", "colorization", "split_brain"])
def test_losses_run_under_bf16_autocast(name):
    torch.manual_seed(0)
    method = build(name)
    x = normalised(method, torch.rand(4, 3, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_loss([x])
    loss = out[0] if isinstance(out, tuple) else out
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", ["colorization", "split_brain"])
def test_regression_variant_trains(name):
    torch.manual_seed(0)
    method = build(name, "method.loss=regression")
    out = method.training_loss([normalised(method, torch.rand(4, 3, 16, 16))])
    assert torch.isfinite(out[0]) and method.counts.sum() == 0
    rows = method.eval().pictures(normalised(method, torch.rand(2, 3, 16, 16)))
    assert all(r.shape == (2, 3, 16, 16) for r in rows.values())
