import pytest
import torch
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf

from src.data.views import (
    Views,
    color_jitter,
    gaussian_blur,
    normalize,
    random_grayscale,
    random_resized_crop_flip,
    shift_hue,
    solarize,
)

MEAN3, STD3 = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
PLAIN = dict(scale=[1, 1], ratio=[1, 1], flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _images(b=4, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def _norm(x, mean, std):
    return (x.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_shapes_dtype_and_group_order():
    views = Views([dict(num=2, size=24), dict(num=3, size=12, blur_p=0.5, solarize_p=0.2)], MEAN3, STD3)
    assert views.num_views == 5
    out = views(_images())
    assert len(out) == 5
    assert [tuple(v.shape) for v in out] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert all(v.dtype == torch.float32 for v in out)


def test_grayscale_images_and_omegaconf_config():
    crops = OmegaConf.create([{"num": 2, "size": 20, "blur_p": 1.0, "scale": [0.2, 1.0]}])
    views = Views(crops, OmegaConf.create([0.5]), OmegaConf.create([0.25]))
    out = views(_images(c=1, h=28, w=28))
    assert len(out) == 2 and all(v.shape == (4, 1, 20, 20) for v in out)
    # values stay inside the normalised [0, 1] range
    assert all(v.min() >= -2 - 1e-6 and v.max() <= 2 + 1e-6 for v in out)


def test_float32_under_autocast():
    views = Views([dict(num=1, size=16, blur_p=1.0), dict(size=8, jitter_p=1.0)], MEAN3, STD3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = views(_images())
    assert all(v.dtype == torch.float32 for v in out)
    assert not out[0].requires_grad


def test_blur_kernel_size_rule():
    sizes = {224: 23, 96: 11, 32: 3, 28: 3}  # odd, about 0.1 * size, at least 3
    for size, k in sizes.items():
        assert Views([dict(size=size)], [0.5], [0.5]).groups[0]["kernel_size"] == k


def test_channel_count_checked():
    with pytest.raises(ValueError, match="C in"):
        Views([dict(size=8)], [0.5], [0.5])(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        Views([dict(size=8)], [0.5], [0.5])(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_randomness_per_view_per_sample_and_seeded():
    views = Views([dict(num=2, size=16)], MEAN3, STD3)
    img = _images(b=1).expand(8, -1, -1, -1).contiguous()  # 8 identical images
    torch.manual_seed(0)
    a = views(img)
    assert not torch.allclose(a[0], a[1])  # two views of the same image differ
    for i in range(1, 8):  # identical images get different views
        assert not torch.allclose(a[0][0], a[0][i])
    torch.manual_seed(0)
    b = views(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.manual_seed(1)
    c = views(img)
    assert not torch.allclose(a[0], c[0])


def test_identity_path_and_flip_are_exact():
    img = _images(c=3, h=16, w=16)
    out = Views([dict(size=16, **PLAIN)], MEAN3, STD3)(img)[0]
    torch.testing.assert_close(out, _norm(img, MEAN3, STD3), atol=1e-5, rtol=0)
    flipped = Views([dict(size=16, **{**PLAIN, "flip_p": 1.0})], MEAN3, STD3)(img)[0]
    torch.testing.assert_close(flipped, _norm(img.flip(-1), MEAN3, STD3), atol=1e-5, rtol=0)
    gray = _images(c=1, h=12, w=12)
    out = Views([dict(size=12, **PLAIN)], [0.5], [0.5])(gray)[0]
    torch.testing.assert_close(out, _norm(gray, [0.5], [0.5]), atol=1e-5, rtol=0)


def test_vertical_flips_and_right_angle_rotations_are_exact_and_per_sample():
    img = _images(b=64, c=3, h=16, w=16)
    vflipped = Views([dict(size=16, **{**PLAIN, "vflip_p": 1.0})], MEAN3, STD3)(img)[0]
    torch.testing.assert_close(vflipped, _norm(img.flip(-2), MEAN3, STD3), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    rotated = Views([dict(size=16, **{**PLAIN, "rot90_p": 0.75})], MEAN3, STD3)(img)[0]
    seen = []
    for i in range(64):  # every view is the image turned by a whole number of quarter turns
        turns = [k for k in range(4)
                 if torch.allclose(rotated[i], _norm(torch.rot90(img[i:i + 1], k, dims=(-2, -1)), MEAN3, STD3)[0],
                                   atol=1e-5, rtol=0)]
        assert len(turns) == 1, i
        seen += turns
    counts = torch.bincount(torch.tensor(seen), minlength=4)
    assert (counts >= 6).all(), counts  # all four orientations occur (16 each expected of 64)
    torch.manual_seed(0)
    plain = Views([dict(size=16, scale=[0.5, 1.0])], MEAN3, STD3)(img)[0]
    torch.manual_seed(0)
    same = Views([dict(size=16, scale=[0.5, 1.0], vflip_p=0.0, rot90_p=0.0)], MEAN3, STD3)(img)[0]
    assert torch.equal(plain, same)  # no extra random draws when they are off: other recipes are unchanged


def test_zero_strength_jitter_is_identity_in_views():
    img = _images(h=16, w=16)
    cfg = {**PLAIN, "jitter_p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    out = Views([dict(size=16, **cfg)], MEAN3, STD3)(img)[0]
    torch.testing.assert_close(out, _norm(img, MEAN3, STD3), atol=1e-5, rtol=0)


def test_quarter_area_crop_covers_half_width_window():
    n = 64  # horizontal and vertical linear ramps, values j / (n - 1)
    ramp = torch.arange(n, dtype=torch.float32) / (n - 1)
    x = torch.stack([ramp.view(1, n).expand(n, n), ramp.view(n, 1).expand(n, n), torch.zeros(n, n)])
    x = x.unsqueeze(0).expand(16, -1, -1, -1).contiguous()
    out = random_resized_crop_flip(x, 32, (0.25, 0.25), (1.0, 1.0), 0.5)
    # a quarter of the area with ratio 1 is a 32x32 window: sample centres span 31 pixels
    for ch in (0, 1):
        span = out[:, ch].amax((1, 2)) - out[:, ch].amin((1, 2))
        torch.testing.assert_close(span, torch.full((16,), 31 / (n - 1)), atol=1e-5, rtol=0)
    left = out[:, 0, 0, :].amin(1) * (n - 1)  # window start positions differ across the batch
    assert left.min() >= -1e-4 and left.max() <= 32 + 1e-4 and left.std() > 1
    # rows are monotone in x: increasing (no flip) or decreasing (flip), both occur
    d = out[:, 0, 0, 1:] - out[:, 0, 0, :-1]
    inc, dec = (d > 0).all(1), (d < 0).all(1)
    assert (inc | dec).all() and inc.any() and dec.any()


def test_random_grayscale_matches_luma():
    x = torch.rand(5, 3, 8, 8)
    y = random_grayscale(x, 1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(y[:, c], luma, atol=1e-6, rtol=0)
    assert torch.equal(random_grayscale(x, 0.0), x)
    g = torch.rand(5, 1, 8, 8)
    assert torch.equal(random_grayscale(g, 1.0), g)
    torch.manual_seed(0)
    y = random_grayscale(torch.rand(200, 3, 2, 2), 0.3)
    frac = (y[:, 0] == y[:, 1]).all((1, 2)).float().mean()
    assert 0.15 < frac < 0.45


def test_solarize_matches_naive():
    x = torch.rand(3, 3, 10, 10)
    x[0, 0, 0, 0] = 0.5
    y = solarize(x, 0.5)
    expected = x.clone()
    for idx in (x >= 0.5).nonzero().tolist():
        expected[tuple(idx)] = 1 - x[tuple(idx)]
    assert torch.equal(y, expected)
    assert y[0, 0, 0, 0] == 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_gaussian_blur_matches_per_sample_torchvision(channels):
    x = torch.rand(4, channels, 20, 17)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    y = gaussian_blur(x, sigma, 7)
    for i in range(4):
        ref = TF.gaussian_blur(x[i : i + 1], kernel_size=[7, 7], sigma=[sigma[i].item()] * 2)
        torch.testing.assert_close(y[i : i + 1], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, sigma, 6)


def test_color_jitter_identity_and_brightness():
    x = torch.rand(4, 3, 8, 8)
    ones, zeros = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(color_jitter(x, ones, ones, ones, zeros), x, atol=1e-5, rtol=0)
    assert torch.equal(color_jitter(x), x)
    const = torch.full((3, 3, 5, 5), 0.5)
    y = color_jitter(const, brightness=torch.tensor([0.5, 1.2, 3.0]))
    torch.testing.assert_close(y[:, 0, 0, 0], torch.tensor([0.25, 0.6, 1.0]))  # clamped to 1
    # contrast/saturation leave a constant grey image unchanged, contrast 0 gives the mean luma
    assert torch.allclose(
        color_jitter(const, contrast=torch.full((3,), 1.7), saturation=torch.full((3,), 0.2)), const
    )
    y = color_jitter(x, contrast=zeros)
    luma_mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((1, 2))
    torch.testing.assert_close(y, luma_mean.view(4, 1, 1, 1).expand_as(x), atol=1e-6, rtol=0)


def test_color_jitter_hue_and_saturation():
    red = torch.zeros(2, 3, 2, 2)
    red[:, 0] = 1.0
    y = color_jitter(red, hue=torch.tensor([1 / 3, -1 / 3]))  # red -> green, red -> blue
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    y = color_jitter(red, saturation=torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(y[0, :, 0, 0], torch.full((3,), 0.299))
    torch.testing.assert_close(y[1, :, 0, 0], torch.tensor([0.6495, 0.1495, 0.1495]))
    gray = torch.rand(2, 1, 4, 4)  # C == 1: hue and saturation are skipped
    assert torch.equal(color_jitter(gray, saturation=torch.zeros(2), hue=torch.full((2,), 0.3)), gray)


def test_shift_hue_matches_torchvision_per_sample():
    x = torch.rand(6, 3, 9, 9)
    x[0, :, 0, 0] = 0.5  # grey pixel: hue undefined, must stay grey
    x[1, :, 0, 0] = torch.tensor([0.7, 0.7, 0.2])  # tie between max channels
    hue = torch.tensor([0.0, 0.1, -0.25, 0.5, -0.5, 0.37])
    y = shift_hue(x, hue)
    for i in range(6):
        ref = TF.adjust_hue(x[i], hue[i].item())
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


def test_normalize():
    x = torch.rand(2, 3, 4, 4)
    y = normalize(x, torch.tensor(MEAN3), torch.tensor(STD3))
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, c] - MEAN3[c]) / STD3[c])


@pytest.mark.parametrize(
    "group, key",
    [
        (dict(size=8, foo=1), "foo"),
        (dict(num=2), "size"),
        (dict(size=0), "size"),
        (dict(size=8, num=0), "num"),
        (dict(size=8, flip_p=1.5), "flip_p"),
        (dict(size=8, jitter_p=-0.1), "jitter_p"),
        (dict(size=8, scale=[0.5, 0.2]), "scale"),
        (dict(size=8, scale=[0.0, 1.0]), "scale"),
        (dict(size=8, scale=[0.5, 1.2]), "scale"),
        (dict(size=8, ratio=[0.0, 1.0]), "ratio"),
        (dict(size=8, ratio=[1.0]), "ratio"),
        (dict(size=8, hue=0.7), "hue"),
        (dict(size=8, brightness=-1), "brightness"),
        (dict(size=8, blur_sigma=[0.0, 1.0]), "blur_sigma"),
        (dict(size=8, solarize_p="x"), "solarize_p"),
    ],
)
def test_invalid_group_raises(group, key):
    with pytest.raises(ValueError, match=rf"crops\[0\].*{key}"):
        Views([group], [0.5], [0.5])


def test_invalid_mean_std_raises():
    with pytest.raises(ValueError, match="mean"):
        Views([dict(size=8)], [0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="std"):
        Views([dict(size=8)], [0.5], [0.0])


def test_eval_view():
    img = _images(h=16, w=16)
    views = Views([dict(size=8)], MEAN3, STD3)
    a, b = views.eval_view(img), views.eval_view(img)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _norm(img, MEAN3, STD3), atol=1e-6, rtol=0)
    same = Views([dict(size=8)], MEAN3, STD3, eval_size=16).eval_view(img)
    torch.testing.assert_close(same, a, atol=0, rtol=0)
    # resize path: a 16x24 image of constant colour -> 8x8, constant stays constant after normalisation
    const = torch.full((2, 3, 16, 24), 51, dtype=torch.uint8)
    out = Views([dict(size=8)], MEAN3, STD3, eval_size=8).eval_view(const)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, _norm(const[..., :8, :8], MEAN3, STD3), atol=1e-5, rtol=0)
    # centre crop: a horizontal ramp resized to height 8 keeps the middle columns
    ramp = (torch.arange(24) * 10).to(torch.uint8).view(1, 1, 1, 24).expand(1, 3, 16, 24)
    out = Views([dict(size=8)], [0.0] * 3, [1.0] * 3, eval_size=8).eval_view(ramp)
    ref = torch.nn.functional.interpolate(ramp.float() / 255, size=(8, 12), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, ref[..., 2:10], atol=1e-6, rtol=0)


def _ks(u: torch.Tensor, v: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    grid = torch.cat([u, v]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True) / len(s)  # noqa: E731
    return float((cdf(u) - cdf(v)).abs().max())


@pytest.mark.parametrize("height, width", [(224, 224), (160, 240)])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width):
    """crop_boxes draws the boxes of torchvision's RandomResizedCrop.get_params (10 tries, then the central crop),
    not clamped ones (which made crops larger: mean area 0.53 instead of 0.48 at scale 0.08-1). Fixed seeds, 10,000
    boxes each: the KS distances of area and aspect ratio stay under 0.03 (the 0.1% critical value is 0.028; the
    clamped sampler was at 0.12 and 0.27)."""
    from torchvision.transforms import RandomResizedCrop

    from src.data.views import crop_boxes

    n, scale, ratio = 10_000, (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
                        for _ in range(n)], dtype=torch.float32)  # i, j, h, w
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / (height * width), ref[:, 3] / ref[:, 2]
    torch.manual_seed(1)
    x0, y0, w, h = crop_boxes(n, height, width, scale, ratio)
    area, aspect = w * h / (height * width), w / h
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width + 1e-3).all() and (y0 + h <= height + 1e-3).all()
    assert abs(float(area.mean() - ref_area.mean())) < 0.015
    assert abs(float((area > 0.9).float().mean() - (ref_area > 0.9).float().mean())) < 0.01
    assert _ks(area, ref_area) < 0.03 and _ks(aspect, ref_ratio) < 0.03


def test_crop_boxes_fall_back_to_the_central_crop():
    from src.data.views import crop_boxes

    x0, y0, w, h = crop_boxes(4, 100, 10, (0.9, 1.0), (1.0, 1.0))  # no square of 90% of a 10 x 100 image fits
    for t, v in ((x0, 0.0), (y0, 45.0), (w, 10.0), (h, 10.0)):
        torch.testing.assert_close(t, torch.full((4,), v))


def test_color_jitter_applies_each_samples_own_order():
    """torchvision's ColorJitter applies brightness, contrast, saturation and hue in a random order per image
    (SimCLR's and BYOL's code too): row i of ``order`` is the sequence for sample i, equal to the ops one by one."""
    torch.manual_seed(0)
    x = torch.rand(24, 3, 8, 8)
    b, c, s = (0.4 + 1.2 * torch.rand(24) for _ in range(3))
    h = torch.rand(24) * 0.4 - 0.2
    order = torch.rand(24, 4).argsort(dim=1)
    out = color_jitter(x, b, c, s, h, order)
    ops = [lambda t, i: color_jitter(t, brightness=b[i:i + 1]), lambda t, i: color_jitter(t, contrast=c[i:i + 1]),
           lambda t, i: color_jitter(t, saturation=s[i:i + 1]), lambda t, i: color_jitter(t, hue=h[i:i + 1])]
    for i in range(24):
        y = x[i:i + 1]
        for k in order[i].tolist():
            y = ops[k](y, i)
        torch.testing.assert_close(out[i:i + 1], y, atol=1e-5, rtol=0)
    fixed = color_jitter(x, b, c, s, h)  # no order: brightness, contrast, saturation, hue
    torch.testing.assert_close(fixed, color_jitter(x, b, c, s, h, torch.arange(4).expand(24, 4)))
    assert not torch.allclose(out, fixed)
    gray = torch.rand(6, 1, 8, 8)  # one channel: brightness and contrast in their order, the rest skipped
    torch.testing.assert_close(color_jitter(gray, b[:6], c[:6], s[:6], h[:6], torch.tensor([[1, 0, 2, 3]] * 6)),
                               color_jitter(color_jitter(gray, contrast=c[:6]), brightness=b[:6]))


def test_grayscale_before_jitter_as_moco_v1():
    """MoCo v1 converts to grayscale before the jitter: a hue shift then changes nothing; after the jitter it does."""
    img = _images(b=8, c=3, h=16, w=16)
    cfg = {**PLAIN, "jitter_p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0.5, "gray_p": 1.0}
    first = Views([dict(size=16, **cfg, gray_before_jitter=1.0)], MEAN3, STD3)(img)[0]
    plain = Views([dict(size=16, **{**cfg, "hue": 0.0})], MEAN3, STD3)(img)[0]
    after = Views([dict(size=16, **cfg)], MEAN3, STD3)(img)[0]
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(after, plain, atol=1e-3)
    with pytest.raises(ValueError, match="gray_before_jitter"):
        Views([dict(size=16, gray_before_jitter=0.5)], MEAN3, STD3)


def test_local_crops_sets_the_count_of_the_smaller_group_and_refuses_what_it_cannot_mean():
    from src.config.compose import compose
    from src.config.rules import config_problems, view_counts

    crops = [{"num": 2, "size": 16}, {"size": 8, "scale": [0.05, 0.4]}]
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    views = Views(crops, mean=[0.5], std=[0.25], local_crops=3)(images)
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8, 8]
    assert len(Views(crops, mean=[0.5], std=[0.25], local_crops=0)(images)) == 2
    assert len(Views(crops, mean=[0.5], std=[0.25])(images)) == 3  # null: the group's own num (1)
    with pytest.raises(ValueError, match=r"views.local_crops=2: these views have no local crops"):
        Views([{"num": 2, "size": 16}], mean=[0.5], std=[0.25], local_crops=2)
    with pytest.raises(ValueError, match=r"views.crops.1.num=4 and views.local_crops=3: .* set views.local_crops=4"):
        Views([crops[0], {**crops[1], "num": 4}], mean=[0.5], std=[0.25], local_crops=3)
    with pytest.raises(ValueError, match=r"views.local_crops=-1: must be an integer >= 0"):
        Views(crops, mean=[0.5], std=[0.25], local_crops=-1)
    cfg = compose(["method=dino", "views.local_crops=3"])
    assert view_counts(cfg) == [1, 1, 3] and config_problems(cfg) == []
    assert config_problems(compose(["method=simclr", "+views.local_crops=2"])) == [
        "views.local_crops=2: these views have no local crops (no crop group smaller than the first); "
        "set views.local_crops=null"]
    assert config_problems(compose(["method=dino", "views.crops.2.num=4"])) == [
        "views.crops.2.num=4 and views.local_crops=8: the local crops' count is views.local_crops; set "
        "views.local_crops=4 instead"]
