"""Two CPU processes (gloo) against one process on the same global batch."""

import os

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch import nn

from src.nn.losses import sinkhorn
from src.utils import distributed as du
from tests.helpers import averaged_over_ranks, tiny_cfg, two_rank_results

GLOBAL_BATCH, DIM = 8, 12


class LinearBackbone(nn.Module):
    """No BatchNorm, so one process and two processes compute the same function."""

    def __init__(self):
        super().__init__()
        self.out_dim = 6
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(x.flatten(1))


def strip_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by the identity: per-rank batch statistics differ from global ones, so
    the compared functions must not contain BatchNorm (SyncBatchNorm covers that on GPUs)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)
    return module


def make(name: str, *overrides: str):
    torch.manual_seed(0)
    cfg = tiny_cfg(name, "data.image_size=4", "data.crop_size=4", *overrides)
    return strip_batchnorm(instantiate(cfg.method, backbone=LinearBackbone(), views=instantiate(cfg.views)))


# methods whose loss and gradients must not depend on how the global batch is split over processes
COMPARED = {
    "simclr": lambda: make("simclr", "method.proj_layers=1"),
    "moco_v3": lambda: make("moco_v3"),
    "barlow_twins": lambda: make("barlow_twins"),
    "vicreg": lambda: make("vicreg"),
    "swav": lambda: make("swav"),
    "dino": lambda: make("dino"),
    "nnclr": lambda: make("nnclr", "method.queue_size=16"),
    "clip": lambda: make("clip"),  # each rank's rows against the gathered columns
    "clip_global": lambda: make("clip", "method.local_loss=false"),  # the whole matrix on every rank
    # SwAV's queue (main_swav.py: queue_length over all processes, each holding its share): full after the first
    # step, in the Sinkhorn problem at the second
    "swav_queue": lambda: make("swav", "method.queue_size=8", "method.queue_start_epoch=0"),
    # colorization's prior: bin counts of the training batches of every process (rebalancing weights at step 2)
    "colorization": lambda: make_dense("colorization"),
}


def make_dense(name: str, *overrides: str):
    """A method that reads a feature map: the tiny convnet without its BatchNorm."""
    torch.manual_seed(0)
    cfg = tiny_cfg(name, "data.image_size=4", "data.crop_size=4", *overrides)
    return strip_batchnorm(instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views)))


def global_batch(seed: int = 1):
    """Two views and caption tokens (start token, 6 words, end token) of the global batch."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, 49000, (GLOBAL_BATCH, 6), generator=g)
    text = torch.cat([torch.full((GLOBAL_BATCH, 1), 49406), words, torch.full((GLOBAL_BATCH, 1), 49407),
                      torch.zeros(GLOBAL_BATCH, 8, dtype=torch.long)], dim=1)  # 16 tokens, as tiny_cfg's
    return {"views": [torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g) for _ in range(2)], "text": text}


def loss_and_grads(model, batch):
    out = model.batch_loss(batch)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def run_steps(model, batches):
    """Loss and gradients of each step (no optimizer: the state buffers carry over between steps). Under DDP every
    buffer is first broadcast from rank 0, as Lightning's DistributedDataParallel does before every forward
    (broadcast_buffers): state kept per process in a buffer would be lost there."""
    out = []
    for batch in batches:
        if dist.is_initialized():
            for b in model.buffers():
                dist.broadcast(b, src=0)
        model.zero_grad()
        out.append(loss_and_grads(model, batch))
    return out


def local_slice(batch, rank, world):
    n = GLOBAL_BATCH // world
    return {"views": [v[rank * n : (rank + 1) * n] for v in batch["views"]], "text": batch["text"][rank * n : (rank + 1) * n]}


STEPS = [global_batch(1), global_batch(2)]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        n = GLOBAL_BATCH // world

        # every compared method: local losses with whatever the method gathers; DDP averages gradients
        result = {}
        for name, factory in COMPARED.items():
            model = factory()
            result[name] = averaged_over_ranks(run_steps(model, [local_slice(v, rank, world) for v in STEPS]))
            result[name + "_state"] = {k: b.clone() for k, b in model.named_buffers()}

        # SwAV's codes: Sinkhorn over the global batch, each rank keeping its own rows
        scores = torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(3))
        n = GLOBAL_BATCH // world
        result["codes"] = sinkhorn(scores[rank * n : (rank + 1) * n], epsilon=0.1, iterations=3)

        # MoCo: the queue receives the keys of both ranks, in rank order, on every rank
        moco = make("moco_v1")
        keys = torch.full((n, moco.queue.features.shape[1]), float(rank + 1))
        moco.queue.push(keys)
        result["queue_head"] = moco.queue.features[:GLOBAL_BATCH].clone()
        result["queue_ptr"] = int(moco.queue.ptr)

        # MoCo's shuffled BatchNorm as hardware=ddp runs it (every BatchNorm converted to SyncBatchNorm first): which
        # images of the global batch of 16 each local key depends on, found by changing one image at a time
        torch.manual_seed(0)
        cfg = tiny_cfg("moco_v1")
        moco = nn.SyncBatchNorm.convert_sync_batchnorm(instantiate(cfg.method, backbone=instantiate(cfg.backbone),
                                                                   views=instantiate(cfg.views))).train()
        images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.manual_seed(0)
            base = moco.keys(images[rank * 8 : (rank + 1) * 8])
            deps = [set() for _ in range(8)]
            for j in range(16):
                changed = images.clone()
                changed[j] += 1.0
                torch.manual_seed(0)  # the same permutation (drawn on rank 0, broadcast)
                moved = (moco.keys(changed[rank * 8 : (rank + 1) * 8]) - base).abs().amax(1) > 1e-6
                for i in moved.nonzero().flatten().tolist():
                    deps[i].add(j)
        result["moco_key_deps"] = deps
        result["moco_query_synced"] = any(isinstance(m, nn.SyncBatchNorm) for m in moco.backbone.modules())

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
    return two_rank_results(_worker, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("name", COMPARED)
def test_loss_and_gradients_match_one_process(two_ranks, name):
    model = COMPARED[name]()
    reference = run_steps(model, STEPS)
    for r in two_ranks:
        for (loss, grads), (ref_loss, ref_grads) in zip(r[name], reference, strict=True):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert grads.keys() == ref_grads.keys() and grads
            # float32 rounding relative to the gradients' scale (e.g. Barlow Twins' last bias has an
            # analytically zero gradient that both sides compute as ~1e-6 noise)
            atol = 1e-6 * max(1.0, max(float(g.abs().max()) for g in ref_grads.values()))
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=atol,
                                           msg=lambda m, k=k: f"{name}: {k}: {m}")
    # state after the steps (NNCLR's support set, DINO's center, queues) agrees across ranks and with one process
    state = dict(model.named_buffers())
    for r in two_ranks:
        assert r[name + "_state"].keys() == state.keys()
        for k, b in state.items():
            torch.testing.assert_close(r[name + "_state"][k], b, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{name}: {k}: {m}")


def test_swav_codes_use_the_global_batch(two_ranks):
    scores = torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(3))
    codes = sinkhorn(scores, epsilon=0.1, iterations=3)
    torch.testing.assert_close(torch.cat([r["codes"] for r in two_ranks]), codes, rtol=1e-5, atol=1e-7)


def test_moco_queue_receives_keys_from_both_processes(two_ranks):
    for r in two_ranks:
        head = r["queue_head"]
        assert torch.all(head[:4] == 1.0) and torch.all(head[4:8] == 2.0)
        assert r["queue_ptr"] == GLOBAL_BATCH


def test_batch_shuffle_round_trip(two_ranks):
    for r in two_ranks:
        torch.testing.assert_close(r["unshuffled"], r["x"])


def test_moco_keys_are_normalised_per_process_after_a_cross_process_shuffle(two_ranks):
    """The reference's shuffled BatchNorm: the global key batch is permuted across processes and each process
    normalises its slice alone (per-GPU BatchNorm, not SyncBatchNorm, although the query encoder is converted): a key
    depends on the 8 images of the slice it was shuffled into, not on its own process's images nor on all 16."""
    for rank, r in enumerate(two_ranks):
        assert r["moco_query_synced"]
        deps, own = r["moco_key_deps"], set(range(rank * 8, rank * 8 + 8))
        assert all(len(d) == 8 and rank * 8 + i in d for i, d in enumerate(deps)), deps
        assert any(d != own for d in deps), "the shuffle must cross processes"
    slices = {frozenset(d) for r in two_ranks for d in r["moco_key_deps"]}
    assert len(slices) == 2 and set().union(*slices) == set(range(16))


def test_helpers_are_identities_at_world_size_one():
    x = torch.randn(4, 3, requires_grad=True)
    assert du.gather_with_grad(x) is x and torch.equal(du.gather(x), x)
    shuffled, undo = du.batch_shuffle(x.detach())
    torch.testing.assert_close(du.batch_unshuffle(shuffled, undo), x.detach())
