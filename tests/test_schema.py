"""Config keys and value types against the constructors that receive them (src/config/keys.py)."""

from typing import Literal

import pytest
from hydra.utils import get_class

from src.config.compose import compose, group_options
from src.config.keys import _matches, accepted_parameters, describe, schema_problems
from src.config.rules import config_problems


def _compose_method(method: str):
    cfg = compose([f"method={method}"])
    if getattr(get_class(cfg.method._target_), "needs_colour", False):
        cfg = compose([f"method={method}", "data=cifar10"])  # colorization, split-brain: RGB data
    return cfg


@pytest.mark.parametrize("method", group_options("method"))
def test_every_method_config_matches_its_code(method):
    cfg = _compose_method(method)
    assert [p.text for p in schema_problems(cfg)] == []
    params, open_kwargs, _ = accepted_parameters(cfg.method._target_)
    assert not open_kwargs, "**kwargs must lead to SSLMethod's explicit parameters"
    assert {"temperature", "optimizer", "warmup_epochs"} & set(params)


@pytest.mark.parametrize("option", [f"{g}={o}" for g in ("data", "views", "eval", "logger", "hardware", "precision",
                                                         "backbone") for o in group_options(g)])
def test_every_group_option_matches_the_code(option):
    assert [p.text for p in schema_problems(compose([option]))] == []


def _texts(*overrides):
    return [p.text for p in schema_problems(compose(list(overrides)))]


def test_unknown_keys_get_the_closest_valid_one():
    assert _texts("+method.temprature=0.1") == [
        "method.temprature: not a parameter of SimCLR; did you mean method.temperature?"]
    assert _texts("+method.optimizer.wight_decay=0.1") == [
        "method.optimizer.wight_decay: not a parameter of LARS; did you mean method.optimizer.weight_decay?"]
    assert _texts("+trainer.max_epoch=3") == [
        "trainer.max_epoch: not a parameter of lightning.Trainer; did you mean trainer.max_epochs?"]
    assert _texts("+eval.knn.kk=3") == ["eval.knn.kk: not a parameter of KNNMonitor; did you mean eval.knn.k?"]
    assert _texts("+views.crops.0.blurp=0.5") == [
        "views.crops.0.blurp: not a parameter of a views crop group; did you mean views.crops.0.blur_p?"]
    assert _texts("logger=wandb", "+logger.wandb.entty=me") == [
        "logger.wandb.entty: not a parameter of WandbLogger; did you mean logger.wandb.entity?"]  # wandb.init's
    assert _texts("+seeed=1") == ["seeed: not a config key; did you mean seed?"]
    assert _texts("+checkpoint.every_n_epoch=2") == [
        "checkpoint.every_n_epoch: not a parameter of checkpoint; did you mean checkpoint.every_n_epochs?"]
    (line,) = _texts("+method.zzz=1")
    assert line.startswith("method.zzz: not a parameter of SimCLR; allowed: ") and "temperature" in line


def test_keys_the_framework_sets_are_refused():
    (line,) = _texts("+method.backbone=x")
    assert line.startswith("method.backbone: set by the framework") and "backbone=..." in line
    (line,) = _texts("+trainer.logger=false")
    assert line.startswith("trainer.logger: set by the framework") and "logger=..." in line
    assert _texts("+eval.final.seed=3")[0].startswith("eval.final.seed: set by the framework")
    assert _texts("logger=wandb", "logger.wandb.init_timeout=5", "logger.wandb.mode=offline") == []


def test_wrong_types_name_key_value_and_expected_type():
    assert _texts("data.batch_size=abc") == ["data.batch_size='abc': expected an integer, got a string"]
    assert _texts("data.batch_size=2.5") == ["data.batch_size=2.5: expected an integer, got a float"]
    assert _texts("method.temperature=1") == []  # an int where a float is expected is fine
    assert _texts("method.temperature=true") == ["method.temperature=true: expected a number, got a bool"]
    assert _texts("trainer.benchmark=fast") == [
        "trainer.benchmark='fast': expected true or false or null, got a string"]
    assert _texts("data.mean=[a,b,c]") == ["data.mean=['a', 'b', 'c']: expected a list of numbers or null"]
    assert _texts("views.crops.0.scale=[0.5]") == ["views.crops.0.scale=[0.5]: expected a list of 2 numbers"]
    assert _texts("method.lr_scaling=5") == ["method.lr_scaling=5: expected a string, got an integer"]
    (line,) = _texts("trainer.precision=15")
    assert line.startswith("trainer.precision=15: expected one of 64, 32, 16, ") and "'bf16-mixed'" in line
    assert _texts("logger=wandb", "logger.wandb.mode=on") == [
        "logger.wandb.mode='on': expected one of 'auto', 'online', 'offline', 'disabled', got a string"]
    assert _texts("seed=x") == ["seed='x': expected an integer, got a string"]
    assert _texts("ckpt_path=5") == ["ckpt_path=5: expected a string or null, got an integer"]
    assert _texts("data.max_train_samples=null", "ckpt_path=null") == []


def test_interpolated_values_are_checked_where_they_are_set_and_hydra_ones_skipped():
    assert _texts("data.crop_size=x") == ["data.crop_size='x': expected an integer or null, got a string"]
    assert _texts("+method.warmup_epochs_note=${hydra:runtime.choices.method}")[0].startswith(
        "method.warmup_epochs_note: not a parameter")  # the key is still checked, the value is not resolved
    assert _texts("data.root=${hydra:runtime.output_dir}") == []
    assert _texts("data.root=${now:%Y}") == []


def test_all_problems_are_reported_at_once():
    problems = config_problems(compose(["+method.temprature=0.1", "data.batch_size=abc", "+trainer.max_epoch=3",
                                        "seed=x", "trainer.deterministic=maybe"]))
    assert len(problems) == 5, problems


def test_type_matching():
    assert _matches(3, float) and not _matches(True, float) and not _matches(True, int)
    assert _matches(None, int | None) and not _matches("a", int | None)
    assert _matches("warn", bool | Literal["warn"] | None) and not _matches("x", bool | Literal["warn"] | None)
    assert _matches([1, 2.5], list[float]) and not _matches([1, "a"], list[float]) and not _matches(1, list[int])
    assert _matches([1.0, 2.0], tuple[float, float]) and not _matches([1.0], tuple[float, float])
    assert describe(int | float | None) == "a number or null"
    assert describe(Literal["a", "b"] | None) == "one of 'a', 'b' or null"


SECRET = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("override", [f"+logger.wandb.api_key={SECRET}", f"+data.token={SECRET}",
                                      f"+method.password={SECRET}", f"+paths.aws_secret={SECRET}"])
def test_secrets_in_the_config_are_refused_without_echoing_them(override):
    problems = config_problems(compose(["logger=wandb", override]))
    key = override[1:].split("=", 1)[0]
    assert len(problems) == 1 and problems[0].startswith(f"{key}: looks like a secret"), problems
    assert "environment variable" in problems[0] and SECRET not in problems[0]


def test_credentials_read_from_the_environment_into_the_config_are_refused():
    (line,) = config_problems(compose(["+paths.leak=${oc.env:AWS_SECRET_ACCESS_KEY}"]))
    assert line.startswith("paths.leak: reads the credential AWS_SECRET_ACCESS_KEY into the config")
    (line,) = config_problems(compose(["logger=wandb", "+logger.wandb.notes=${oc.env:WANDB_API_KEY,none}"]))
    assert line.startswith("logger.wandb.notes: reads the credential WANDB_API_KEY")
    (line,) = config_problems(compose(["logger=wandb", "+logger.wandb.api_key=${oc.env:WANDB_API_KEY}"]))
    assert line.startswith("logger.wandb.api_key: reads the credential WANDB_API_KEY")
    assert config_problems(compose(["paths.data_dir=${oc.env:DATA_DIR,data}"])) == []  # not a credential


def test_cross_field_rules():
    def problems(*overrides):
        return config_problems(compose(list(overrides)))

    assert problems("data.crop_size=32") == [
        "data.crop_size=32 is larger than data.image_size=28: the random crops are cut from the stored image; "
        "use data.crop_size<=28 or raise data.image_size"]  # one line, not a second one for views.crops[0]
    assert problems("data.eval_batch_size=0") == ["data.eval_batch_size=0 must be a positive number"]
    assert problems("data.max_train_samples=100")[0].startswith(
        "data.max_train_samples=100 is smaller than the global batch 256")
    assert problems("data.max_train_samples=256") == []
    assert problems("trainer.accumulate_grad_batches=0") == [
        "trainer.accumulate_grad_batches=0 must be >= 1 (1: no accumulation)"]
    assert problems("checkpoint.every_n_epochs=0")[0].startswith("checkpoint.every_n_epochs=0 must be >= 1")
    assert problems("trainer.devices=0")[0].startswith("trainer.devices=0: use a positive count")
    assert problems("data.channels=3") == [
        "data.mean=[0.286] and data.std=[0.353]: need one entry per channel but data.channels=3"]
    assert problems("views.crops.0.flip_p=2") == ["views.crops[0].flip_p=2.0: must be in [0, 1]"]
    assert problems("logger=wandb", "logger.wandb.init_timeout=0") == [
        "logger.wandb.init_timeout=0 must be a positive number of seconds"]


def test_gpu_device_count_is_checked(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert config_problems(compose(["hardware=gpu", "trainer.devices=2"])) == []
    (line,) = config_problems(compose(["hardware=gpu", "trainer.devices=4"]))
    assert line.startswith("trainer.devices=4 but 2 GPU(s) are visible") and "trainer.devices=2 or -1" in line
    (line,) = config_problems(compose(["hardware=gpu", "trainer.devices=[0,2]"]))
    assert line.startswith("trainer.devices=[0, 2] names a GPU index outside 0..1")
    assert config_problems(compose(["hardware=ddp"])) == []  # -1: all visible GPUs
