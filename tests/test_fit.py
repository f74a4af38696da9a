"""conf/fit/method/<method>_<hardware>.yaml: what a method changes to fit the hardware, applied by composition alone
(the same for src.train, src.eval and sweeps), logged, overridable, and never in GPU runs or recipes."""

import pytest
from omegaconf import OmegaConf

from src.config.compose import CONF_DIR, compose, fitted, group_options

FITS = sorted((CONF_DIR / "fit" / "method").glob("*.yaml"))


@pytest.mark.parametrize("path", FITS, ids=lambda p: p.stem)
def test_a_fit_file_names_a_method_and_keys_it_has(path):
    method, hardware = path.stem.rsplit("_", 1)
    assert method in group_options("method") and hardware in group_options("hardware")
    own = compose([f"method={method}", "hardware=gpu"]).method  # the method's own config (moco: moco_v2's)
    fit = OmegaConf.load(path)
    assert set(fit.keys()) <= {"method", "data"} and fit.get("method", {}) or fit.get("data")
    assert set(fit.get("method", {}).keys()) <= set(own.keys()), f"{path.name} sets keys {method}.yaml lacks"


def test_the_cpu_gets_the_fit_and_other_hardware_the_papers_sizes():
    cpu = compose(["method=dino"], return_hydra_config=True)
    assert (cpu.method.out_dim, cpu.method.hidden_dim) == (4096, 1024)
    line = fitted(cpu, cpu.hydra.runtime.choices)
    assert line.startswith("CPU-sized (conf/fit/method/dino_cpu.yaml): method.out_dim 4096 instead of 65536")
    assert compose(["method=dino", "hardware=gpu"]).method.out_dim == 65536
    assert compose(["experiment=dino_vit_small_imagenet"]).method.out_dim == 65536
    mine = compose(["method=dino", "method.out_dim=512"], return_hydra_config=True)
    assert mine.method.out_dim == 512 and "out_dim" not in fitted(mine, mine.hydra.runtime.choices)
    plain = compose(["method=simclr"], return_hydra_config=True)
    assert fitted(plain, plain.hydra.runtime.choices) is None
