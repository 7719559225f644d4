"""Recipes resolve to the seeds' hyper-parameters; overrides and mistakes behave."""

from __future__ import annotations

import pytest

from visionzoo.config import from_dict, load_config, recipe_names, to_dict, to_yaml
from visionzoo.errors import UserError

SUPERVISED = ["alexnet_imagenet", "densenet201_imagenet", "fashion_mnist", "nfnet_f0_imagenet", "resnet50_cifar100"]


def test_every_supervised_recipe_is_shipped():
    assert set(SUPERVISED) <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_resolves_and_round_trips(name):
    cfg = load_config(name)
    assert cfg.recipe == name and cfg.seed_target and cfg.source
    assert from_dict(to_dict(cfg)) == cfg
    assert f"recipe: {name}" in to_yaml(cfg)


def test_seed_hyper_parameters():
    a = load_config("alexnet_imagenet")
    assert (a.data.batch_size, a.optim.lr, a.optim.momentum, a.optim.weight_decay) == (1024, 0.04, 0.9, 1e-4)
    assert (a.schedule.name, a.schedule.by, a.train.label_smoothing, a.train.epochs) == ("cosine", "epoch", 0.1, 90)
    d = load_config("densenet201_imagenet")
    assert (d.data.batch_size, d.optim.lr, d.train.epochs, d.train.seed) == (1024, 0.8, 40, 1234)
    assert d.train.loss_scale == "1024"
    r = load_config("resnet50_cifar100")
    assert (r.model.name, r.data.batch_size, r.optim.lr, r.optim.weight_decay) == ("cifar_resnet50", 128, 0.1, 5e-4)
    assert (r.schedule.milestones, r.schedule.gamma, r.train.epochs) == ([60, 120, 160], 0.2, 200)
    assert r.data.mean == [129.304, 124.070, 112.434] and r.data.std == [68.170, 65.392, 70.418]
    n = load_config("nfnet_f0_imagenet")
    assert (n.model.library, n.model.name) == ("timm", "dm_nfnet_f0")
    assert (n.model.drop_rate, n.model.drop_path_rate) == (0.2, 0.25)
    assert (n.optim.nesterov, n.optim.clip_mode, n.optim.clip_value) == (True, "agc", 0.01)
    assert n.optim.agc_exclude == ["head.fc"]
    assert (n.optim.weight_decay, n.optim.lr) == (2e-5, 0.1)
    assert (n.schedule.warmup_epochs, n.schedule.warmup_lr, n.schedule.min_lr) == (5, 7e-7, 6e-7)
    assert (n.train.mixup, n.train.cutmix, n.train.mixup_switch_prob, n.train.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert n.data.randaugment == "rand-m5-n4-mstd0.5-inc1"
    assert (n.data.image_size, n.data.test_size, n.data.interpolation) == (192, 256, "bicubic")
    assert (n.train.epochs, n.train.init_scale) == (360, 1024)


def test_overrides_change_values_with_types():
    cfg = load_config("resnet50_cifar100",
                      ["optim.lr=0.2", "data.batch_size=64", "schedule.milestones=[1,2]", "model.kwargs.foo=3"])
    assert cfg.optim.lr == 0.2 and cfg.data.batch_size == 64 and cfg.schedule.milestones == [1, 2]
    assert cfg.model.kwargs == {"foo": 3}
    # YAML reads a bare `off` as false: the word the help text offers must still work.
    assert load_config("fashion_mnist", ["log.progress=off"]).log.progress == "off"
    assert load_config("fashion_mnist", ["train.mixup_mode=elem"]).train.mixup_mode == "elem"


def test_a_mapping_override_replaces_the_recipes_mapping_and_a_dotted_key_changes_one_entry():
    shipped = {"width": 16, "stem": "patch", "pool": 7}
    assert load_config("fashion_mnist").model.kwargs == shipped
    assert load_config("fashion_mnist", ["model.kwargs={}"]).model.kwargs == {}
    assert load_config("fashion_mnist", ["model.kwargs={depth: 2}"]).model.kwargs == {"depth": 2}
    assert load_config("fashion_mnist", ["model.kwargs.depth=2"]).model.kwargs == {**shipped, "depth": 2}
    # the next override applies to the replaced mapping; a list value stays a type error
    assert load_config("fashion_mnist", ["model.kwargs={}", "model.kwargs.a=1"]).model.kwargs == {"a": 1}
    with pytest.raises(UserError, match="model.kwargs"):
        load_config("fashion_mnist", ["model.kwargs=[1,2]"])


def test_the_recipes_kwargs_left_for_another_model_are_named_in_one_line():
    from visionzoo.models import build_model

    cfg = load_config("fashion_mnist", ["model.library=timm", "model.name=resnet18"])
    with pytest.raises(UserError) as err:
        build_model(cfg.model, 10, 1)
    assert str(err.value) == ("timm resnet18 takes no argument 'width' of model.kwargs={width: 16, stem: patch, "
                              "pool: 7} (the recipe's kwargs are for its own model: give resnet18's, "
                              "e.g. model.kwargs={})")
    cfg = load_config("fashion_mnist", ["model.name=small_cnn", "model.kwargs={widht: 4}"])
    with pytest.raises(UserError, match="visionzoo small_cnn takes no argument 'widht'"):
        build_model(cfg.model, 10, 1)


@pytest.mark.parametrize("override, words", [
    (["optim.lrr=0.1"], ["unknown config key", "optim.lr"]),
    (["data.batch_size=big"], ["data.batch_size"]),
    (["train.amp=fp8"], ["train.amp", "fp16"]),
    (["optim.lr"], ["key=value"]),
    (["data.batch_size=0"], ["batch_size"]),
    (["train.mixup_mode=pair"], ["train.mixup_mode", "elem"]),
])
def test_bad_overrides_are_user_errors(override, words):
    with pytest.raises(UserError) as e:
        load_config("fashion_mnist", override)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'resnet50_cifar100'"):
        load_config("resnet50_cifar10")


def test_recipe_file_with_unknown_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(UserError, match="did you mean 'data.batch_size'"):
        load_config(str(f))
    f.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(f))


def test_fp64_is_a_supervised_precision():
    assert load_config("fashion_mnist", ["train.amp=fp64"]).train.amp == "fp64"
    with pytest.raises(UserError, match="fp64 is for supervised runs"):
        load_config("dino_fashion_mnist", ["train.amp=fp64"])


def test_every_numeric_key_has_a_range():
    """ranges.RANGES covers every int/float (or list of them) key of the schema."""
    import dataclasses

    from visionzoo.config import RecipeConfig
    from visionzoo.ranges import RANGES

    numeric = []
    for section in dataclasses.fields(RecipeConfig):
        if not dataclasses.is_dataclass(section.default_factory if section.default_factory is not dataclasses.MISSING
                                         else None):
            continue
        for f in dataclasses.fields(section.default_factory):
            if str(f.type) in ("int", "float", "list[float]", "list[int]"):
                numeric.append(f"{section.name}.{f.name}")
    assert numeric and sorted(set(numeric) - set(RANGES)) == []


@pytest.mark.parametrize("override, words", [
    ("train.epochs=-1", "train.epochs=-1 is out of range (must be >= 0)"),
    ("data.hflip=1.5", "data.hflip=1.5 is out of range (must be 0 to 1)"),
    ("data.crop_scale=[0.5,2]", "data.crop_scale=[0.5, 2.0] is out of range"),
    ("train.keep_checkpoints=0", "must be >= 1"),
])
def test_numbers_out_of_range_are_refused(override, words):
    with pytest.raises(UserError) as err:
        load_config("fashion_mnist", [override])
    assert words in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("schedule.milestones=30,60", "override 'schedule.milestones=30,60': schedule.milestones takes a list of whole "
                                  "numbers: write schedule.milestones=[30,60] (currently [])"),
    ("data.hflip=yes", "override 'data.hflip=yes': data.hflip takes a number, not 'yes' (currently 0.5)"),
    ("train.epochs=1.5", "override 'train.epochs=1.5': train.epochs takes a whole number, not '1.5' (currently 4)"),
    ("model.pretrained=maybe", "override 'model.pretrained=maybe': model.pretrained takes true or false, not 'maybe' "
                               "(currently false)"),
    ("data.path=[1]", "override 'data.path=[1]': data.path takes a text value or null, not '[1]' (currently null)"),
    ("lr=0.1", "override 'lr=0.1': unknown config key 'lr'; keys have a section: did you mean optim.lr=0.1 "
               "(or the flag --lr 0.1)?"),
    ("batch_size=64", "override 'batch_size=64': unknown config key 'batch_size'; keys have a section: did you mean "
                      "data.batch_size=64 (or the flag --batch-size 64)?"),
    ("name=x", "override 'name=x': unknown config key 'name'; keys have a section: did you mean data.name, model.name, "
               "optim.name or schedule.name?"),
    ("optim.lr=[1", "override 'optim.lr=[1': the value is not valid YAML (while parsing a flow sequence)"),
])
def test_wrong_types_and_bare_keys_are_told_in_the_projects_words(override, message):
    with pytest.raises(UserError) as err:
        load_config("fashion_mnist", [override])
    assert str(err.value) == message


def test_a_recipe_file_with_a_wrong_type_names_the_default(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  epochs: many\n")
    with pytest.raises(UserError) as err:
        load_config(str(f))
    assert str(err.value) == "recipe mine: train.epochs takes a whole number, not 'many' (default 90)"
    f.write_text("schedule:\n  milestones: 30\n")
    with pytest.raises(UserError) as err:
        load_config(str(f))
    assert str(err.value) == ("recipe mine: schedule.milestones takes a list of whole numbers: "
                              "write schedule.milestones=[30] (default [])")
