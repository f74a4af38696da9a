"""Two CPU processes (gloo) against one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from torch import nn

from src.utils import distributed as du
from tests.helpers import tiny_cfg

GLOBAL_BATCH, DIM = 8, 12


class LinearBackbone(nn.Module):
    """No BatchNorm, so one process and two processes compute the same function."""

    def __init__(self):
        super().__init__()
        self.out_dim = 6
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_simclr():
    torch.manual_seed(0)
    cfg = tiny_cfg("simclr", "method.proj_layers=1", "data.image_size=4", "data.crop_size=4")
    return instantiate(cfg.method, backbone=LinearBackbone(), views=instantiate(cfg.views))


def make_moco():
    torch.manual_seed(0)
    cfg = tiny_cfg("moco_v1", "data.image_size=4", "data.crop_size=4")
    return instantiate(cfg.method, backbone=LinearBackbone(), views=instantiate(cfg.views))


def global_views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g) for _ in range(2)]


def simclr_step(model, views):
    loss = model.training_loss(views)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        n = GLOBAL_BATCH // world
        local = [v[rank * n : (rank + 1) * n] for v in global_views()]

        # SimCLR: local loss with negatives gathered from both ranks; DDP would average the gradients
        model = make_simclr()
        loss, grads = simclr_step(model, local)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
        result = {"simclr_loss": loss / world, "simclr_grads": {k: g / world for k, g in grads.items()}}

        # MoCo: the queue receives the keys of both ranks, in rank order, on every rank
        moco = make_moco()
        keys = torch.full((n, moco.queue.shape[1]), float(rank + 1))
        moco.enqueue(keys)
        result["queue_head"] = moco.queue[: GLOBAL_BATCH].clone()
        result["queue_ptr"] = int(moco.queue_ptr)

        # shuffled BatchNorm: shuffle then unshuffle of the identity returns this rank's own rows
        x = torch.arange(n, dtype=torch.float32).unsqueeze(1) + 100 * rank
        shuffled, undo = du.batch_shuffle(x)
        result["unshuffled"] = du.batch_unshuffle(shuffled, undo)
        result["x"] = x
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_simclr_loss_and_gradients_match_one_process(two_ranks):
    loss, grads = simclr_step(make_simclr(), global_views())
    for r in two_ranks:
        torch.testing.assert_close(r["simclr_loss"], loss, rtol=1e-5, atol=1e-6)
        assert r["simclr_grads"].keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(r["simclr_grads"][k], grads[k], rtol=1e-4, atol=1e-6)


def test_moco_queue_receives_keys_from_both_processes(two_ranks):
    for r in two_ranks:
        head = r["queue_head"]
        assert torch.all(head[:4] == 1.0) and torch.all(head[4:8] == 2.0)
        assert r["queue_ptr"] == GLOBAL_BATCH


def test_batch_shuffle_round_trip(two_ranks):
    for r in two_ranks:
        torch.testing.assert_close(r["unshuffled"], r["x"])


def test_helpers_are_identities_at_world_size_one():
    x = torch.randn(4, 3, requires_grad=True)
    assert du.gather_with_grad(x) is x and torch.equal(du.gather(x), x)
    shuffled, undo = du.batch_shuffle(x.detach())
    torch.testing.assert_close(du.batch_unshuffle(shuffled, undo), x.detach())
