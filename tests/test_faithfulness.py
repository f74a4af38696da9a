"""Construction details checked against the authors' reference code (docs/faithfulness.md): what the teachers
run, which layers have bias or BatchNorm, initialisation, shuffled BatchNorm, crop sampling, per-process state,
the codebook's restarts and the fine-tuning parameter groups."""

import lightning as L
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

from src.methods.base import SSLMethod
from tests.helpers import METHODS, ROOT, tiny_cfg


def build(cfg):
    return instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))



def method_classes() -> dict[str, type]:
    """The class of every conf/method/*.yaml that names one (aliases such as moco.yaml name none), read from the
    files themselves: composing each config would cost a second apiece."""
    out = {}
    for name in METHODS:
        target = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml").get("_target_")
        if target:
            out[name] = get_class(target)
    return out


# every method with a momentum copy, found from its class (a method added later is checked the day it appears)
MOMENTUM_METHODS = [m for m, c in method_classes().items() if c.momentum_pairs is not SSLMethod.momentum_pairs]


def test_the_momentum_methods_are_found():
    assert {"moco_v1", "moco_v2", "moco_v3", "byol", "dino"} <= set(MOMENTUM_METHODS)


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_teachers_run_without_stochastic_depth(name):
    """DINO builds its teacher without drop path (main_dino.py: drop_path_rate goes to the student only), MoCo v3's
    and BYOL's momentum encoders have none: two training-mode teacher passes on one batch give the same output,
    while the student (drop path 0.2) does not. The target's BatchNorm stays in training mode."""
    L.seed_everything(0)
    method = build(tiny_cfg(name, "backbone.drop_path_rate=0.2", vit=True))
    method.train()
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(method.backbone(x), method.backbone(x)), "the student must keep its drop path"
    pairs = method.momentum_pairs()
    backbones = [t for o, t in pairs if o is method.backbone]
    assert backbones, f"{name}: no momentum copy of the backbone among momentum_pairs()"
    with torch.no_grad():
        for target in backbones:
            assert target.training
            torch.testing.assert_close(target(x), target(x), rtol=0, atol=0)
    for _, target in pairs:  # heads too: nothing random left anywhere in a teacher
        for m in target.modules():
            assert getattr(m, "drop_prob", 0.0) == 0.0, m
            assert not isinstance(m, nn.modules.dropout._DropoutNd) or m.p == 0.0, m
