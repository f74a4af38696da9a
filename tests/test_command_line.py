"""Hydra's own command-line flags work with every group choice: the arguments resume=auto and multi-node runs add
never take a flag's value for an override, and Hydra's refusals are one line."""

import pytest

from src.config.command_line import launch_arguments
from tests.helpers import run_cli

FLAGS = [["--cfg", "job"], ["-c", "job"], ["--cfg", "job", "--package", "method"], ["--config-name", "train"],
         ["-cn", "train"], ["-cp", "../conf"], ["--config-path", "../conf"], ["--info"], ["--info", "config"],
         ["--help"], ["-h"], ["--hydra-help"], ["-m"], ["--multirun"], ["--resolve", "--cfg", "all"]]
CHOICES = [["hardware=gpu"], ["hardware=multinode"], ["experiment=simclr_resnet18_cifar10"], ["trainer.num_nodes=2"],
           ["resume=auto"], ["hardware=ddp_cpu", "method=moco_v2", "resume=auto", "trainer.num_nodes=4"]]


@pytest.mark.parametrize("flags", FLAGS, ids=" ".join)
def test_flags_go_to_hydra_untouched_with_any_group_choice(flags):
    for choices in CHOICES:
        for argv in ([*choices, *flags], [*flags, *choices]):
            assert launch_arguments(argv) == argv  # nothing composed, nothing added


def test_without_flags_multinode_runs_still_get_their_one_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.chdir(tmp_path)
    added = launch_arguments(["trainer.num_nodes=2", "method=byol"])
    assert added[-1] == "hydra.run.dir=outputs/byol_convnet_fashion_mnist/slurm_77"


@pytest.mark.slow
def test_flags_print_or_refuse_in_one_line(tmp_path):
    shown = run_cli("hardware=gpu", "experiment=dino_vit_small_imagenet", "trainer.num_nodes=2", "--cfg", "job",
                    "--package", "method")
    assert shown.returncode == 0 and "_target_: src.methods.dino.DINO" in shown.stdout, shown.stderr[-2000:]
    info = run_cli("-cn", "train", "-cp", "../conf", "hardware=multinode", "resume=auto", "--info", "defaults")
    assert info.returncode == 0 and "hardware/multinode" in info.stdout, info.stderr[-2000:]
    refused = run_cli("-m", "method=simclr,byol", "hardware=gpu", "--cfg", "job")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "Only one of" in lines[0], refused.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
