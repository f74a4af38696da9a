"""The CLI as a user runs it: `python -m src.train ...` in a subprocess."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli, tiny_tokenizer

TINY = ["data=digits", "backbone.width=8", "trainer.max_epochs=2", "data.batch_size=128",
        "eval.final.linear_epochs=20", "method.warmup_epochs=0"]

pytestmark = pytest.mark.slow


def test_tiny_run_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "eval.knn.every_n_epochs=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("method", "backbone", "data", "epochs", "knn_top1", "linear_top1", "random_knn_top1",
                "random_linear_top1", "wall_time_s", "train_images_per_s", "peak_memory_mib"):
        assert key in results, key
    assert (results["method"], results["backbone"], results["data"], results["epochs"]) == ("simclr", "convnet", "digits", 2)
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1"):
        assert 20.0 < results[key] <= 100.0, (key, results[key])  # 10 classes: chance is 10%
    assert results["train_images_per_s"] > 0 and results["peak_memory_mib"] > 0
    assert "kNN top-1 (%)" in proc.stdout and "results.json" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "eval/knn_top1" in metrics and "eval/online_val_top1" in metrics


def test_pretext_runs_draw_pictures_and_report_pretext_accuracy(tmp_path):
    from PIL import Image

    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=rotation,inpainting", *TINY, "eval=final_only", "eval.final.linear_epochs=5",
                   "logger=wandb", "logger.wandb.mode=offline", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rotation,), (inpainting,) = sorted(sweep.glob("*rotation*")), sorted(sweep.glob("*inpainting*"))
    results = json.loads((rotation / "results.json").read_text())
    assert 25.0 < results["pretext_acc"] <= 100.0  # 4 rotations: chance is 25%
    assert results["random_knn_top1"] > 10.0  # the random baseline is a fresh rotation model
    assert not (rotation / "pictures").exists()
    pictures = sorted((inpainting / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["pretext_0002.png"]  # eval=final_only: the last epoch only
    width, height = Image.open(pictures[0]).size
    side = (width - 2) // 8 - 2  # 8 digits side by side, 2 px padding
    assert side >= 8 and height == 3 * (side + 2) + 2  # rows: input / prediction / target
    assert "pretext_acc" not in json.loads((inpainting / "results.json").read_text())
    assert list((inpainting / "wandb").glob("offline-run-*/files/media/images/pretext_*.png"))  # and to W&B


def test_vit_run_draws_attention_maps_and_reconstructions(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("method=mae", "backbone=vit_cpu", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
                   "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2", "data=digits",
                   "data.batch_size=128", "trainer.max_epochs=1", "method.warmup_epochs=0", "eval=final_only",
                   "eval.final.linear_epochs=5", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["method"], results["backbone"]) == ("mae", "vit_cpu")
    assert results["knn_top1"] > 10.0 and results["random_knn_top1"] > 10.0  # 10 classes
    assert sorted(p.name for p in (run_dir / "pictures").glob("*.png")) == ["attention_0001.png", "pretext_0001.png"]


def test_multirun_writes_one_result_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=simclr,moco_v2", *TINY, "trainer.max_epochs=1",
                   "eval=final_only", "eval.final.random_baseline=false", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2, list(sweep.rglob("*"))
    assert {json.loads(p.read_text())["method"] for p in results} == {"simclr", "moco_v2"}


SECRET = "4f0c1d2e3b4a59687766554433221100ffeeddcc"  # 40 characters, like a W&B API key
IMAGES = "{images}"  # in BAD_INPUTS: a folder the test builds from IMAGE_TREES[case]
TOKENIZER = "{tokenizer}"  # in BAD_INPUTS: a tokenizer checkpoint (tests/helpers.py tiny_tokenizer: stride 4, RGB)
WEIGHTS = "{weights}"  # in BAD_INPUTS: torchvision's resnet18 state dict (ImageNet stem)
STRICT = ["data=imagefolder", f"data.root={IMAGES}", "data.labelled=false", "data.val_dir=null", "data.image_size=8",
          "data.crop_size=8", "data.batch_size=4", "data.num_workers=2", "data.skip_bad_images=false",
          "backbone.width=8", "eval=none", "trainer.max_epochs=1"]  # one batch of 4 holds the broken file

BAD_INPUTS = {
    "unknown method": (["method=mocoo"], "unknown method 'mocoo'; available: barlow_twins, beit, byol, "),
    "unknown backbone": (["backbone=resnet7"], "unknown backbone 'resnet7'"),
    "unknown dataset": (["data=mnist2"], "unknown data 'mnist2'"),
    "missing dataset root": (["method=moco", "data=imagenet"], "data.root is not set"),
    "dataset root does not exist": (["data=imagefolder", "data.root=/nonexistent/images"], "does not exist"),
    "non-positive lr": (["method.optimizer.lr=-0.1"], "method.optimizer.lr=-0.1 must be a positive number"),
    "zero temperature": (["method.temperature=0"], "method.temperature=0 must be a positive number"),
    "non-positive batch size": (["data.batch_size=0"], "data.batch_size=0 must be a positive number"),
    "batch too small for the loss": (["data.batch_size=1"], "too small for SimCLR's loss"),
    "view larger than the image": (["views.crops.0.size=64"], "views.crops[0].size=64 is larger than data.image_size=28"),
    "queue not a multiple of the batch": (["method=moco", "method.queue_size=1000"], "multiple of the global batch 256"),
    "swav queue not a multiple of the batch": (["method=swav", "method.queue_size=1000"],
                                               "method.queue_size=1000 must be a multiple of the global batch 256"),
    "local crops larger than the global ones": (["views=multicrop", "views.crops.0.size=10"],
                                                "views.crops[1].size=12 is larger than views.crops[0].size=10"),
    "typo in a key": (["method.temprature=0.1"], "unknown config key 'method.temprature'; did you mean 'method.temperature'?"),
    "gpu without a gpu": (["hardware=gpu"], "needs a CUDA GPU but none is visible"),
    "missing checkpoint to resume": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt is not a file"),
    "unknown resume mode": (["resume=maybe"], "resume='maybe': expected one of 'auto' or null"),
    "unknown non-finite loss policy": (["nonfinite_loss=ignore"], "nonfinite_loss='ignore': expected one of 'stop', 'skip'"),
    "colorization on grayscale data": (["method=colorization"],
                                       "needs colour (RGB) images but data=fashion_mnist has data.channels=1"),
    "split-brain on grayscale data": (["method=split_brain", "data=digits"],
                                      "needs colour (RGB) images but data=digits has data.channels=1"),
    "jigsaw grid larger than the crop": (["method=jigsaw", "data=digits"], "needs views.crops[0].size >= "),
    "patch grid larger than the crop": (["method=relative_patch", "data=digits"], "needs views.crops[0].size >= "),
    # keys and types against the code (src/config/keys.py)
    "wrong type for an integer": (["data.batch_size=abc"], "data.batch_size='abc': expected an integer, got a string"),
    "wrong type for a flag": (["trainer.benchmark=fast"], "trainer.benchmark='fast': expected true or false or null"),
    "value outside the allowed literals": (["trainer.precision=15"], "trainer.precision=15: expected one of 64, 32, 16"),
    "unknown key added with +": (["+method.temprature=0.1"],
                                 "method.temprature: not a parameter of SimCLR; did you mean method.temperature?"),
    "unknown trainer key added with +": (["+trainer.max_epoch=3"],
                                         "trainer.max_epoch: not a parameter of lightning.Trainer; did you mean "
                                         "trainer.max_epochs?"),
    "unknown crop key added with +": (["+views.crops.0.blurp=0.5"], "did you mean views.crops.0.blur_p?"),
    "unknown top-level key added with +": (["+seeed=1"], "seeed: not a config key; did you mean seed?"),
    "key the framework sets": (["+trainer.logger=false"], "trainer.logger: set by the framework, not by the config"),
    "secret in the config": (["logger=wandb", f"+logger.wandb.api_key={SECRET}"],
                             "logger.wandb.api_key: looks like a secret; credentials must not be in the config"),
    # rules between fields
    "crop larger than the image": (["data.crop_size=32"], "data.crop_size=32 is larger than data.image_size=28"),
    "eval batch size zero": (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be a positive number"),
    "max_train_samples below the global batch": (["data.max_train_samples=100"],
                                                 "data.max_train_samples=100 is smaller than the global batch 256"),
    "no gradient accumulation": (["trainer.accumulate_grad_batches=0"],
                                 "trainer.accumulate_grad_batches=0 must be >= 1"),
    "checkpoint interval zero": (["checkpoint.every_n_epochs=0"], "checkpoint.every_n_epochs=0 must be >= 1"),
    "mean and std not one per channel": (["data.channels=3"], "need one entry per channel but data.channels=3"),
    "augmentation probability above 1": (["views.crops.0.flip_p=2"], "views.crops[0].flip_p=2.0: must be in [0, 1]"),
    # folder datasets
    "empty image folder": (["data=imagefolder", f"data.root={IMAGES}"], f"no images under {IMAGES}/train"),
    "one class folder where evaluation needs labels": (["data=imagefolder", f"data.root={IMAGES}"],
                                                       f"{IMAGES}/train has one class folder (only)"),
    "broken image with data.skip_bad_images=false": (STRICT, f"cannot read image {IMAGES}/train/broken.png ("),
    # ViTs and masked image modelling
    "image size not a multiple of the patch size": (["backbone=vit_cpu", "backbone.patch_size=5"],
                                                    "backbone.img_size=28 is not a multiple of backbone.patch_size=5"),
    "local crop not a multiple of the patch size": (["backbone=vit_cpu", "views=multicrop", "views.crops.1.size=10"],
                                                    "views.crops[1].size=10 is not a multiple of backbone.patch_size=4"),
    "mask ratio outside (0, 1)": (["method=mae", "backbone=vit_cpu", "method.mask_ratio=1.2"],
                                  "method.mask_ratio=1.2 must be in (0, 1)"),
    "MAE on a convnet": (["method=mae", "backbone=convnet"], "MAE needs a ViT backbone with the token API: use backbone=vit_cpu"),
    "BEiT without a tokenizer": (["method=beit", "backbone=vit_cpu"], "method=beit needs a visual tokenizer: train one "
                                 "with `python -m src.train method=vqvae`"),
    "BEiT with a tokenizer of another grid": (["method=beit", "backbone=vit_cpu", "data=fake", "backbone.patch_size=8",
                                               f"method.tokenizer={TOKENIZER}"],
                                              "makes one token per 4x4 px but the ViT's patches are 8x8"),
    "unknown timm model": (["backbone=timm", "backbone.name=convnxt_tiny"],
                           "backbone.name=convnxt_tiny is not a timm architecture; did you mean convnext_tiny"),
    "transfer dataset missing offline": (["data=eurosat", f"data.root={IMAGES}", "data.download=false"],
                                         f"EuroSAT is not under data.root={IMAGES} and data.download=false: "
                                         "torchvision expects eurosat/2750/<class>/*.jpg there"),
    # image–text
    "CLIP without captions": (["method=clip", "data.captions=null"], "method=clip needs image–text pairs: set data.captions=class_prompts"),
    "caption file missing": (["method=clip", "data=captions", "data.captions=/nonexistent/pairs.csv"],
                             "data.captions=/nonexistent/pairs.csv: no such file"),
    "WebDataset shard missing": (["method=clip", "data=captions", "data.captions='/nonexistent/{0..1}.tar'"],
                                 "shard /nonexistent/0.tar does not exist (2 of 2 missing)"),
    "weights of another shape": (["backbone=resnet18", f"backbone.pretrained={WEIGHTS}"],
                                 "does not fit this resnet18 with the CIFAR stem: 1 have another shape (e.g. "
                                 "conv1.weight (64, 3, 7, 7) instead of (64, 1, 3, 3))"),
}
FAIL_IN_TRAINING = {"broken image with data.skip_bad_images=false",  # a UserError from a loader worker
                    "weights of another shape"}  # found when the backbone is built
IMAGE_TREES = {  # relative paths: "dir/" an empty folder, "x.png" a small image, "x.png!" a broken file
    "empty image folder": ["train/a/", "train/b/"],
    "one class folder where evaluation needs labels": ["train/only/0.png", "train/only/1.png", "val/only/0.png"],
    "broken image with data.skip_bad_images=false": ["train/0.png", "train/1.png", "train/2.png", "train/broken.png!"],
}


def _build_tree(root: Path, entries: list[str]) -> None:
    from PIL import Image

    for rel in entries:
        path = root / rel.rstrip("!/")
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("!"):
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
        else:
            Image.new("RGB", (12, 10), (200, 40, 40)).save(path)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, tmp_path):
    """Run from tmp_path with Hydra's default run folder (outputs/<method>_<backbone>_<data>/<time>), next to
    an earlier run of the same name: the call must leave every file under tmp_path as it was."""
    import os

    args, expected = BAD_INPUTS[case]
    images = tmp_path / "images"
    _build_tree(images, IMAGE_TREES.get(case, []))
    places = {IMAGES: str(images)}
    if any(TOKENIZER in a for a in args):
        places[TOKENIZER] = tiny_tokenizer()
    if any(WEIGHTS in a for a in args):
        import torchvision

        places[WEIGHTS] = str(tmp_path / "resnet18.pth")
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), places[WEIGHTS])
    for key, value in places.items():
        args, expected = [a.replace(key, value) for a in args], expected.replace(key, value)
    earlier = tmp_path / "outputs" / "simclr_convnet_fashion_mnist" / "2020-01-01_00-00-00-000000"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(os.urandom(256))
    (earlier / "results.json").write_text('{"method": "simclr", "knn_top1": 50.0}\n')
    before = _files(tmp_path)
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert expected in errors[0], errors[0]
    if case not in FAIL_IN_TRAINING:  # the others fail before Lightning says anything
        assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == errors, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr, "a secret is never echoed"
    assert _files(tmp_path) == before, "nothing may be written or changed for a run that cannot start"
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p != earlier]
    assert runs == [], f"no run folder may be left behind: {runs}"


def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=simclr,mocoo", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and "unknown method 'mocoo'" in proc.stderr
    assert not Path(sweep).exists()


# The W&B tests look at logging, not learning: 2 training steps and a short final evaluation.
WANDB_RUN = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval=final_only",
             "eval.final.random_baseline=false", "eval.final.linear_epochs=2", "logger=wandb"]


def _no_credentials_env(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path / "wandb_home"), "PYTHONWARNINGS": "ignore"}


def test_wandb_without_credentials_logs_offline(tmp_path):
    run_dir = tmp_path / "run"
    args = [*WANDB_RUN, f"hydra.run.dir={run_dir}"]
    proc = run_cli(*args, env=_no_credentials_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "results.json").is_file()


def test_wandb_failure_never_takes_the_run_down(tmp_path):
    """mode=online without credentials: W&B cannot start online, so the run logs offline instead."""
    run_dir = tmp_path / "run"
    args = [*WANDB_RUN, "logger.wandb.mode=online", f"hydra.run.dir={run_dir}"]
    proc = run_cli(*args, env=_no_credentials_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stderr + proc.stdout
    assert output.count("W&B online logging failed") == 1 and "logging offline into" in output, output[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]
    assert (run_dir / "results.json").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def _all_bytes_containing(root: Path, *needles: str) -> list[str]:
    """Files under ``root`` (read as bytes: checkpoints, wandb's binary logs included) holding any needle."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


def test_unreachable_wandb_falls_back_to_offline_within_the_timeout(tmp_path):
    """An API key but a W&B server that refuses connections: init gives up after logger.wandb.init_timeout
    seconds and the run logs offline; it finishes and writes results.json."""
    import secrets
    import time

    key = secrets.token_hex(20)  # 40 characters, like a W&B API key
    env = {**_no_credentials_env(tmp_path), "WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    run_dir = tmp_path / "run"
    args = [*WANDB_RUN, "logger.wandb.mode=online", "logger.wandb.init_timeout=5", f"hydra.run.dir={run_dir}"]
    start = time.monotonic()
    proc = run_cli(*args, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stderr + proc.stdout
    assert output.count("W&B online logging failed") == 1 and "logging offline into" in output, output[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]
    assert (run_dir / "results.json").is_file() and (run_dir / "csv" / "metrics.csv").is_file()
    assert elapsed < 180, f"the run took {elapsed:.0f} s: W&B's init must give up after init_timeout"
    assert _all_bytes_containing(tmp_path, key) == [] and key not in output


def test_secrets_in_the_environment_never_land_in_run_files(tmp_path):
    """W&B's key and another credential in the environment, logger=wandb (offline): neither string appears in
    any file the run writes (.hydra/, csv, wandb's offline files, checkpoints, results) nor in its output."""
    import secrets

    wandb_key, aws_secret = secrets.token_hex(20), secrets.token_urlsafe(30)
    env = {**_no_credentials_env(tmp_path), "WANDB_API_KEY": wandb_key, "AWS_SECRET_ACCESS_KEY": aws_secret,
           "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper()}
    run_dir = tmp_path / "run"
    args = [*WANDB_RUN, "logger.wandb.mode=offline", f"hydra.run.dir={run_dir}"]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {".hydra/config.yaml", "results.json", "checkpoints/last.ckpt", "csv/metrics.csv"} <= written, written
    assert any(w.startswith("wandb/offline-run-") for w in written), written
    assert _all_bytes_containing(tmp_path, wandb_key, aws_secret, env["AWS_ACCESS_KEY_ID"]) == []
    assert wandb_key not in proc.stdout + proc.stderr and aws_secret not in proc.stdout + proc.stderr


def test_imagefolder_run_reads_a_class_per_folder_tree(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))  # varied sizes and modes
                arr = np.clip(rng.normal(colour, 30, size=(*size[::-1], 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
                (img.convert("L") if i % 5 == 0 else img).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    proc = run_cli("data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=16", "data.crop_size=16",
                   "data.batch_size=32", "data.num_workers=0", "backbone.width=8", "trainer.max_epochs=1",
                   "eval=final_only", "eval.final.random_baseline=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["eval_val_split"] == "val" and results["eval_val_items"] == 32
    assert results["knn_top1"] > 75.0  # two colours are easy to tell apart


def test_resume_from_last_checkpoint_continues_training(tmp_path):
    common = [*TINY, "method=moco_v2", "eval=final_only", "eval.final.random_baseline=false"]
    first = run_cli(*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = run_cli(*common, "trainer.max_epochs=2", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["epochs"] == 2
    import torch

    state = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * (1437 // 128)  # digits train split, drop_last
