"""Published recipes (conf/experiment/*.yaml): each composes with its own data, passes the pre-flight check and
takes one optimizer step on fake data of its dataset's shape (at 224 px a ResNet-50 step costs 5-12 s here; what
happens over many steps is test_methods' part, on tiny configs); LARS's clipped trust ratio follows its formula."""

import re

import lightning as L
import pytest
import torch

from src.config.compose import CONF_DIR, compose, group_options
from src.config.rules import config_problems
from src.nn.optim import LARS
from tests.test_methods import build, fit

EXPERIMENTS = group_options("experiment")


def test_every_recipe_states_its_published_figure_and_source():
    assert len(EXPERIMENTS) >= 20
    for name in EXPERIMENTS:
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
        assert text.startswith("# @package _global_\n"), name
        assert "%" in header or "top-1" in header, f"{name}: no published figure in the header"
        assert re.search(r"\b[\w-]+/[\w.-]+", header) or "paper" in header.lower(), f"{name}: no source"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipe_keeps_its_data_passes_preflight_and_takes_a_step_on_fake_data_of_that_shape(name):
    own = compose([f"experiment={name}"], return_hydra_config=True)
    assert own.hydra.runtime.choices.data in ("cifar10", "imagenet")  # what users run stays in the yaml
    shaped = [f"experiment={name}", "data=fake", f"data.image_size={own.data.image_size}",
              f"data.crop_size={own.data.crop_size}", "data.batch_size=2", "hardware=cpu", "precision=fp32",
              "eval=none", "logger=none"]
    cfg = compose(shaped)
    assert config_problems(cfg) == []
    L.seed_everything(0)
    method, dm = build(cfg)
    trainer = fit(method, dm, steps=1)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_command_line_views_choice_still_wins_over_a_recipe():
    cfg = compose(["experiment=byol_resnet18_cifar10", "views=satellite"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.views == "satellite" and cfg.views.crops[0].rot90_p == 0.75


@pytest.mark.parametrize("clip", [False, True])
def test_lars_step_follows_the_trust_ratio_formula(clip):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])  # ||g + wd w|| = ||[0.9, 1.2]|| = 1.5 with wd 0.1
    lr, eta, wd = 0.5, 0.02, 0.1
    LARS([w], lr=lr, momentum=0.9, weight_decay=wd, eta=eta, clip=clip).step()
    trust = eta * 5 / 1.5
    scale = min(trust / lr, 1.0) if clip else trust
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - lr * scale * torch.tensor([0.9, 1.2]))
