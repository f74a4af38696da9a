"""conf/fit/method/<method>_<hardware>.yaml: what a method changes to fit the hardware, applied by composition alone
(the same for src.train, src.eval and sweeps), logged, overridable, and never in GPU runs or recipes."""

import pytest
from omegaconf import OmegaConf

from src.config.compose import CONF_DIR, compose, fitted, group_options

FITS = sorted((CONF_DIR / "fit" / "method").glob("*.yaml"))
DATA_FITS = sorted((CONF_DIR / "fit" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", FITS, ids=lambda p: p.stem)
def test_a_fit_file_names_a_method_and_keys_it_has(path):
    method, hardware = path.stem.rsplit("_", 1)
    assert method in group_options("method") and hardware in group_options("hardware")
    own = compose([f"method={method}", "hardware=gpu"])  # the method's own config (moco: moco_v2's)
    fit = OmegaConf.load(path)
    assert set(fit.keys()) <= {"method", "views", "data", "trainer"} and fit.get("method", {}) or fit.get("data")
    for top in fit:
        assert set(fit[top].keys()) <= set(own[top].keys()), f"{path.name} sets {top} keys {method} lacks"


def test_the_cpu_gets_the_fit_and_other_hardware_the_papers_sizes():
    cpu = compose(["method=dino"], return_hydra_config=True)
    assert (cpu.method.out_dim, cpu.method.hidden_dim) == (4096, 1024)
    [line] = [ln for ln in fitted(cpu, cpu.hydra.runtime.choices) if "CPU-sized" in ln]
    assert line.startswith("CPU-sized (conf/fit/method/dino_cpu.yaml): method.out_dim 4096 instead of 65536")
    assert compose(["method=dino", "hardware=gpu"]).method.out_dim == 65536
    assert compose(["experiment=dino_vit_small_imagenet"]).method.out_dim == 65536
    mine = compose(["method=dino", "method.out_dim=512"], return_hydra_config=True)
    assert mine.method.out_dim == 512 and "out_dim" not in " ".join(fitted(mine, mine.hydra.runtime.choices))
    plain = compose(["method=simclr", "data=cifar10"], return_hydra_config=True)
    assert fitted(plain, plain.hydra.runtime.choices) == []


@pytest.mark.parametrize("path", DATA_FITS, ids=lambda p: p.stem)
def test_a_data_fit_names_a_backbone_and_data_and_keys_they_have(path):
    backbone = next(b for b in group_options("backbone") if path.stem.startswith(b + "_"))
    data = path.stem[len(backbone) + 1:]
    assert data in group_options("data")
    own = compose([f"backbone={backbone}", f"data={data}"]).backbone
    assert set(OmegaConf.load(path).keys()) == {"backbone"} and set(OmegaConf.load(path).backbone) <= set(own)


def test_the_fashion_mnist_showcase_pools_over_a_grid_and_everything_else_globally():
    assert compose([]).backbone.pool_grid == 4  # the default run: data=fashion_mnist
    for data in ("imagefolder", "cifar10", "pets", "stl10"):
        assert compose([f"data={data}", "data.image_size=32"]).backbone.pool_grid == 1, data
    shown = compose([], return_hydra_config=True)
    assert any("fitted to data=fashion_mnist" in ln and "backbone.pool_grid 4 instead of 1" in ln
               for ln in fitted(shown, shown.hydra.runtime.choices))


def test_a_fit_beyond_the_method_changes_views_and_epochs_and_says_so():
    cpu = compose(["method=dinov2"], return_hydra_config=True)
    assert (cpu.views.local_crops, cpu.trainer.max_epochs, cpu.method.out_dim) == (2, 3, 1024)
    [line] = fitted(cpu, cpu.hydra.runtime.choices)
    assert "views.local_crops 2 instead of 8" in line and "trainer.max_epochs 3 instead of 7" in line
    mine = compose(["method=dinov2", "trainer.max_epochs=5"], return_hydra_config=True)
    assert mine.trainer.max_epochs == 5 and "max_epochs" not in " ".join(fitted(mine, mine.hydra.runtime.choices))
    gpu = compose(["method=ibot", "hardware=gpu"])
    assert (gpu.views.local_crops, gpu.trainer.max_epochs, gpu.method.out_dim) == (10, 7, 8192)


def test_rotation_keeps_the_global_pool_where_the_data_fit_would_give_it_a_grid():
    rotation = compose(["method=rotation"], return_hydra_config=True)
    assert rotation.backbone.pool_grid == 1 and not fitted(rotation, rotation.hydra.runtime.choices)
    assert compose(["method=rotation", "backbone.pool_grid=4"]).backbone.pool_grid == 4
    assert compose(["method=jigsaw"]).backbone.pool_grid == 4  # the other methods keep the fit
