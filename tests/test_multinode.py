"""Two "nodes" of one CPU process each on localhost (NODE_RANK, MASTER_ADDR, MASTER_PORT; gloo), as Lightning runs
on a cluster without SLURM: the same SimCLR loss and gradients as one process on the same global batch, and one
run folder with one results.json through the CLI. (About 30 s: four processes of Lightning start-up.)"""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from src.data.sampler import EpochSampler
from tests.helpers import ROOT, free_port
from tests.multinode_worker import FixedViews, datamodule, model
from tests.test_distributed import loss_and_grads

pytestmark = pytest.mark.slow


def two_nodes(args: list[str], extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_nodes_give_the_loss_and_gradients_of_one_process(tmp_path):
    nodes = two_nodes(["-m", "tests.multinode_worker"], {"OUT": str(tmp_path)})
    assert all(n.returncode == 0 for n in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    L.seed_everything(0, verbose=False)  # one process, the same 8 images (the sampler's first 8 of epoch 0)
    reference = model()
    dm = datamodule(8)
    dm.setup("fit")
    images = torch.stack([dm.pretrain[i][0] for i in EpochSampler(len(dm.pretrain), seed=0).indices()[:8]])
    loss, grads = loss_and_grads(reference, {"views": FixedViews()(images)})

    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    for r in ranks:
        assert r["grads"].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_two_nodes_through_the_cli_write_one_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "two_nodes"
    args = ["-m", "src.train", "hardware=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "data=digits",
            "data.batch_size=64", "backbone.width=8", "trainer.max_epochs=1", "eval=final_only",
            "eval.final.linear_epochs=5", "eval.final.random_baseline=false", f"hydra.run.dir={run_dir}"]
    nodes = two_nodes(args)
    assert all(n.returncode == 0 for n in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two_nodes"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["devices"] == 2 and results["effective_batch_size"] == 128 and results["knn_top1"] > 50
    assert "results:" in nodes[0].stdout and "results:" not in nodes[1].stdout  # the table comes from rank 0 only
