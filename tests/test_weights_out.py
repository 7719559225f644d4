"""Weights out (``visionzoo export --format hf|torchvision|dino|mmcls``): each layout loads in the
library it is for with the run's outputs (timm's local-dir folders, torchvision's strict
load_state_dict) and back through visionzoo's readers of the released layouts; the key names
are checked against the released files' key lists, written out below from the reference code;
the model card's YAML metadata parses and its results table is results.json's."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml

import visionzoo
from visionzoo.checkpoint import checkpoint_pairs, load_model, load_state, save_weights, sha256_file
from visionzoo.cli import main, parse_args
from visionzoo.commands.export import export_checkpoint
from visionzoo.config import from_dict, load_config, to_dict, to_yaml
from visionzoo.errors import UserError
from visionzoo.models import build_model
from visionzoo.models.weights import model_from_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def released_dino_vit_keys(depth: int) -> list[str]:
    """The keys of DINO's released ``dino_*_pretrain.pth``: vision_transformer.py's
    VisionTransformer(num_classes=0) state dict (hubconf.py loads the file into it strictly)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):  # Block: norm1, attn (qkv with bias, proj), norm2, mlp (fc1, fc2)
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"]
    return keys + ["norm.weight", "norm.bias"]


# DINOHead(use_bn=False, nlayers=3): Linear, GELU, Linear, GELU, Linear, then nn.utils.weight_norm's last layer.
RELEASED_DINO_HEAD_KEYS = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                           "last_layer.weight_g", "last_layer.weight_v"]


def released_mmcls_resnet50_cifar_keys() -> list[str]:
    """mmcls 0.24 ImageClassifier(backbone=ResNet_CIFAR(depth=50), neck=GlobalAveragePooling,
    head=LinearClsHead) state dict: the 3x3 stem conv1 + bn1 (build_norm_layer's 'bn' + postfix),
    layerN (ResLayer) of Bottlenecks conv1/bn1, conv2/bn2, conv3/bn3 and, in each stage's first
    block, downsample = Sequential(conv, bn); head.fc."""
    keys = ["backbone.conv1.weight", *(f"backbone.bn1.{p}" for p in BN)]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            pre = f"backbone.layer{stage}.{b}."
            for i in (1, 2, 3):
                keys += [f"{pre}conv{i}.weight", *(f"{pre}bn{i}.{p}" for p in BN)]
            if b == 0:
                keys += [f"{pre}downsample.0.weight", *(f"{pre}downsample.1.{p}" for p in BN)]
    return keys + ["head.fc.weight", "head.fc.bias"]


def _images(chans: int, size: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(7))


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(x)


def _random_run(run: Path, recipe: str, overrides: list[str], classes: list[str]) -> Path:
    """A run folder with a random-init model.safetensors carrying the metadata training writes."""
    cfg = load_config(recipe, overrides)
    net, args = build_model(cfg.model, len(classes), cfg.data.in_chans)
    run.mkdir(parents=True, exist_ok=True)
    save_weights(run / "model.safetensors", net, {"config": to_dict(cfg), "model": args, "classes": classes,
                                                  "epoch": 0, "acc1": None})
    return run


@pytest.fixture(scope="module")
def timm_run(fmnist_dir: Path, tmp_path_factory) -> Path:
    """A trained run of a timm architecture (timm's test_resnet) on Fashion-MNIST-format data: 2 steps."""
    root = tmp_path_factory.mktemp("timm_run")
    cfg = load_config("fashion_mnist")
    cfg = replace(cfg, recipe="fm_timm", model=replace(cfg.model, name="test_resnet", library="timm", kwargs={}))
    (root / "fm_timm.yaml").write_text(to_yaml(cfg))
    assert main(["train", str(root / "fm_timm.yaml"), "--data", str(fmnist_dir), "--output", str(root / "run"),
                 "--epochs", "1", "--workers", "0", "--device", "cpu", "--amp", "none", "data.batch_size=32",
                 "train.max_steps_per_epoch=2", "log.progress=off"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def dino_run(fmnist_dir: Path, tmp_path_factory) -> Path:
    """A DINO run of a 1-block ViT, one step: its checkpoint pair holds student, teacher and optimizer."""
    run = tmp_path_factory.mktemp("dino_run") / "run"
    assert main(["train", "dino_fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--epochs", "1",
                 "--workers", "0", "--device", "cpu", "--amp", "none", "data.batch_size=16",
                 "train.max_steps_per_epoch=1", "log.progress=off",
                 "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, "
                 "dynamic_img_size: true}",
                 "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[5]",
                 "dino.knn_report_k=5"]) == 0
    return run


# ----------------------------------------------------------------------------- hf

def test_timm_run_as_hf_folder_loads_in_timm_with_the_runs_logits(timm_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(timm_run), "--format", "hf", "--output", str(out)]) == 0
    assert 'read back by visionzoo.load, timm.create_model("local-dir:..."): max abs diff 0.00e+00' in \
        capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "model.safetensors.sha256", "recipe.yaml"]
    model, meta = load_model(timm_run)
    x = _images(1, 28)
    expected = _outputs(model, x)
    net = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(_outputs(net, x), expected, rtol=0, atol=1e-5)
    loaded = visionzoo.load(out)  # any architecture: visionzoo's metadata in the safetensors header
    torch.testing.assert_close(_outputs(loaded.model, x), expected, rtol=0, atol=0)
    assert loaded.classes == meta["classes"]

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["label_names"] == meta["classes"] and config["model_args"]["in_chans"] == 1
    data = timm.data.resolve_data_config({}, model=net)  # timm's preprocessing is the recipe's evaluation
    assert data["input_size"] == (1, 28, 28) and data["crop_pct"] == 1.0 and data["interpolation"] == "bilinear"
    assert data["mean"] == pytest.approx([72.94 / 255]) and data["std"] == pytest.approx([90.02 / 255])
    sha = sha256_file(out / "model.safetensors")
    assert (out / "model.safetensors.sha256").read_text() == f"{sha}  model.safetensors\n"


@pytest.mark.parametrize("resize, crop", [(256, 224), (73, 64), (36, 32), (232, 224), (0, 28)])
def test_hf_crop_pct_gives_timm_the_recipes_resize(resize: int, crop: int) -> None:
    from types import SimpleNamespace

    from visionzoo.models.weights_out import hf_config

    d = SimpleNamespace(test_resize=resize, test_size=crop, interpolation="bilinear", mean=[128.0], std=[64.0])
    args = {"name": "small_cnn", "library": "visionzoo", "num_classes": 2, "in_chans": 1, "kwargs": {}}
    cfg = hf_config(torch.nn.Linear(1, 1), args, ["a", "b"], d, crop)["pretrained_cfg"]
    # timm's eval transform resizes the short side to floor(input_size / crop_pct), then centre-crops.
    assert math.floor(crop / cfg["crop_pct"]) == (resize or crop)
    assert cfg["mean"] == [128.0 / 255] and cfg["input_size"] == [1, crop, crop]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first Markdown table under ``heading``: first cell -> the other cells."""
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}  # without the header row


def test_model_card_metadata_and_results_table_are_the_runs(timm_run: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    export_checkpoint(str(timm_run), fmt="hf", output=str(out))
    text = (out / "README.md").read_text()
    results = json.loads((timm_run / "results.json").read_text())
    cfg = from_dict(load_model(timm_run)[1]["config"])

    meta = _front_matter(text)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"] and meta["license"] == "other"
    assert {"visionzoo", "timm", "fm_timm"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["dataset"] == {"name": "Fashion-MNIST", "type": "zalando-datasets/fashion_mnist", "split": "test"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": results["Acc@1"],
                                                                   "top_5_accuracy": results["Acc@5"]}
    card = ModelCard(text)  # huggingface_hub reads the metadata as the Hub does
    assert [r.metric_value for r in card.data.eval_results] == [results["Acc@1"], results["Acc@5"]]

    table = _table(text, "## Results")
    assert table["Acc@1"] == [f"{results['Acc@1']:.2f}", cfg.seed_target]
    assert table["Acc@5"][0] == f"{results['Acc@5']:.2f}"
    assert table["training images/s"][0] == f"{results['FPS']:.2f}"
    assert table["epochs"] == [str(results["epochs"]), str(cfg.train.epochs)]
    for line in ("- **Devices:** 1 x cpu", "- **Precision:** fp32",
                 f"- **Time:** {results['E2ETrainingTime']:.1f} s end to end, 2 steps",
                 "  name: test_resnet\n  library: timm", "  lr: 0.2\n"):
        assert line in text, line
    files = _table(text, "## Files")
    assert files["model.safetensors"] == [f"`{sha256_file(out / 'model.safetensors')}`"]

    # The command that trains it again parses, and its recipe.yaml is the run's resolved recipe.
    (command,) = re.findall(r"^visionzoo train recipe\.yaml .*$", text, flags=re.M)
    args = parse_args(shlex.split(command)[1:])
    assert args.command == "train" and args.data == cfg.data.path
    again = load_config(str(out / "recipe.yaml"))
    assert to_dict(again) == {**to_dict(cfg), "output": None}


# ----------------------------------------------------------------------------- torchvision

@pytest.mark.parametrize("arch, recipe, overrides, size", [
    ("alexnet", "alexnet_imagenet", ["data.test_resize=73", "data.test_size=64"], 64),
    ("densenet201", "densenet201_imagenet", ["data.test_resize=36", "data.test_size=32"], 32),
])
def test_torchvision_layout_loads_strictly_into_torchvision(tmp_path: Path, arch: str, recipe: str,
                                                            overrides: list[str], size: int) -> None:
    run = _random_run(tmp_path / "run", recipe, overrides, [f"class_{i}" for i in range(10)])
    assert main(["export", str(run), "--format", "torchvision"]) == 0
    (path,) = run.glob(f"{arch}-*.pth")
    sha = sha256_file(path)
    # torchvision's download naming: torch.hub's check_hash compares this prefix with the file's sha256.
    assert re.search(torch.hub.HASH_REGEX, path.name).group(1) == sha[:8]
    assert Path(f"{path}.sha256").read_text() == f"{sha}  {path.name}\n"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = getattr(torchvision.models, arch)(num_classes=10)
    net.load_state_dict(sd, strict=True)
    x = _images(3, size, n=2)
    torch.testing.assert_close(_outputs(net, x), _outputs(load_model(run)[0], x), rtol=0, atol=0)
    if arch == "densenet201":  # today's names, not the norm.1 / conv.1 of torchvision's oldest files
        assert "features.denseblock4.denselayer32.norm1.weight" in sd and not [k for k in sd if ".norm.1" in k]


# ----------------------------------------------------------------------------- dino

def test_dino_run_as_released_backbone_and_training_checkpoint(dino_run: Path, tmp_path: Path) -> None:
    from visionzoo.engine.tasks.dino import build_student_teacher

    out = tmp_path / "dino_vit1_pretrain.pth"
    assert main(["export", str(dino_run), "--format", "dino", "--full-checkpoint", "--output", str(out)]) == 0
    model, meta = load_model(dino_run)
    cfg = from_dict(meta["config"])
    x = _images(1, cfg.data.image_size)  # the recipe's 27 px crops (3x3 patches of 9 px)
    expected = _outputs(model, x)

    backbone = torch.load(out, map_location="cpu", weights_only=True)
    assert list(backbone) == released_dino_vit_keys(depth=1)
    # DINO's utils.load_pretrained_weights: strip module. / backbone., load into its ViT (timm's names).
    dino_vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **cfg.model.kwargs)
    dino_vit.load_state_dict({k.replace("module.", "").replace("backbone.", ""): v for k, v in backbone.items()},
                             strict=True)
    torch.testing.assert_close(_outputs(dino_vit, x), expected, rtol=0, atol=0)
    again, _ = model_from_weights(cfg.model, out, 0, 1)  # visionzoo's reader of *_pretrain.pth
    torch.testing.assert_close(_outputs(again, x), expected, rtol=0, atol=0)

    full = tmp_path / "dino_vit1_pretrain_full_checkpoint.pth"
    ck = torch.load(full, map_location="cpu", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ck)
    teacher_keys = [f"backbone.{k}" for k in released_dino_vit_keys(1)] + [f"head.{k}" for k in RELEASED_DINO_HEAD_KEYS]
    assert list(ck["teacher"]) == teacher_keys  # main_dino.py: a teacher without BatchNorm is no DDP module
    assert list(ck["student"]) == [f"module.{k}" for k in teacher_keys]
    state = load_state(checkpoint_pairs(dino_run)[0][1])["task"]  # the DINO task's state (engine/tasks/dino.py)
    assert ck["epoch"] == 1 and torch.equal(ck["dino_loss"]["center"], state["dino_loss"]["center"])
    assert ck["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    g, v = ck["teacher"]["head.last_layer.weight_g"], ck["teacher"]["head.last_layer.weight_v"]
    assert g.shape == (64, 1) and v.shape == (64, 16)  # nn.utils.weight_norm's gain and direction
    for key in ("teacher", "student"):
        net, _ = model_from_weights(replace(cfg.model, checkpoint_key=key), full, 0, 1)
        ref, _ = build_model(replace(cfg.model, weights=None), 0, 1)
        ref.load_state_dict({k.removeprefix("backbone."): t for k, t in state[key].items()
                             if k.startswith("backbone.")})
        torch.testing.assert_close(_outputs(net, x), _outputs(ref, x), rtol=0, atol=0)
    # DINO training starts from it: student and teacher as the run's teacher, head included.
    cpu = torch.device("cpu")
    student, _, _ = build_student_teacher(replace(cfg, model=replace(cfg.model, weights=str(full))), cpu, ddp=False)
    _, teacher, _ = build_student_teacher(replace(cfg, model=replace(cfg.model, weights=None)), torch.device("cpu"),
                                          ddp=False)
    teacher.load_state_dict(state["teacher"])
    torch.testing.assert_close(_outputs(student, x), _outputs(teacher, x), rtol=0, atol=0)


def test_dino_layout_refuses_a_vit_whose_feature_pools_its_patch_tokens() -> None:
    """dino_fashion_mnist's ViT (global_pool avg) would load into DINO's ViT, which returns [CLS]:
    a different feature, so the layout says why it cannot hold it; a [CLS] ViT passes that check."""
    import timm

    from visionzoo.models.weights_out import unfit

    kw = dict(num_classes=0, in_chans=1, img_size=28, patch_size=7, embed_dim=24, depth=1, num_heads=3)
    args = {"library": "timm", "name": "vit_tiny_patch16_224", "num_classes": 0}
    pooled = timm.create_model("vit_tiny_patch16_224", global_pool="avg", **kw)
    assert unfit("dino", pooled, args, "dino") == (
        "DINO's ViT reads its [CLS] token, this backbone's feature pools its patch tokens (global_pool avg)")
    assert unfit("dino", timm.create_model("vit_tiny_patch16_224", **kw), args, "dino") is None


def test_a_layout_that_cannot_hold_the_model_is_one_line_naming_those_that_can(timm_run: Path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(["export", str(timm_run), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.strip()

    assert error("--format", "dino") == (
        "visionzoo: error: --format dino cannot hold timm test_resnet (DINO's layout is for the backbones of DINO "
        "runs, this is a classifier); it exports as onnx, torchscript, pt2, hf")
    assert error("--format", "mmcls") == (
        "visionzoo: error: --format mmcls cannot hold timm test_resnet (mmcls's layout is for ResNets: visionzoo "
        "cifar_resnet*, torchvision resnet*); it exports as onnx, torchscript, pt2, hf")
    assert error("--format", "torchvision") == (
        "visionzoo: error: --format torchvision cannot hold timm test_resnet (torchvision's layout is for "
        "torchvision's own architectures); it exports as onnx, torchscript, pt2, hf")
    assert error("--format", "hf", "--full-checkpoint") == (
        "visionzoo: error: --full-checkpoint is for --format dino (this export is hf)")
    assert error("--format", "hf", "--precision", "int8") == (
        "visionzoo: error: --precision is for ONNX exports, not --format hf")
    assert not list(timm_run.glob("*.pth")) and not (timm_run / "model_hf").exists()


# ----------------------------------------------------------------------------- mmcls

def test_resnet50_cifar100_as_mmcls_checkpoint_and_back(tmp_path: Path, capsys) -> None:
    classes = [f"c{i}" for i in range(100)]
    run = _random_run(tmp_path / "run", "resnet50_cifar100", [], classes)
    assert main(["export", str(run), "--format", "mmcls"]) == 0
    assert "read back by visionzoo --weights (mmcls): max abs diff 0.00e+00" in capsys.readouterr().out
    (path,) = run.glob("resnet50_cifar100_mmcls-*.pth")
    assert path.name == f"resnet50_cifar100_mmcls-{sha256_file(path)[:8]}.pth"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ck["state_dict"]) == released_mmcls_resnet50_cifar_keys()
    assert len(ck["state_dict"]) == 320 and ck["state_dict"]["head.fc.weight"].shape == (100, 2048)
    assert ck["meta"]["CLASSES"] == classes and ck["meta"]["dataset_meta"] == {"classes": classes}
    x = _images(3, 32, n=2)
    expected = _outputs(load_model(run)[0], x)
    again, _ = model_from_weights(load_config("resnet50_cifar100").model, path, 100, 3)  # visionzoo's mmcls reader
    torch.testing.assert_close(_outputs(again, x), expected, rtol=0, atol=0)

    # --weights FILE --recipe NAME works for the layouts too: the mmcls file as an hf folder.
    hf = tmp_path / "r50_hf"
    assert main(["export", "--weights", str(path), "--recipe", "resnet50_cifar100", "--format", "hf",
                 "--output", str(hf)]) == 0
    torch.testing.assert_close(_outputs(visionzoo.load(hf).model, x), expected, rtol=0, atol=0)
    text = (hf / "README.md").read_text()
    assert f"visionzoo export --weights {path.resolve()} --recipe resnet50_cifar100 --format hf" in text
    assert _front_matter(text)["datasets"] == ["uoft-cs/cifar100"]


def test_a_file_that_does_not_read_back_the_same_is_not_kept(tmp_path: Path, monkeypatch) -> None:
    from visionzoo.models import weights_out

    overrides = ["model.name=resnet18", "model.drop_rate=0", "data.test_resize=36", "data.test_size=32"]
    run = _random_run(tmp_path / "run", "alexnet_imagenet", overrides, [f"class_{i}" for i in range(10)])
    layout = weights_out.torchvision_layout

    def off_by_one_bias(model: torch.nn.Module) -> dict:  # a writer that gets one tensor wrong
        sd = layout(model)
        sd["fc.bias"] = sd["fc.bias"] + 1
        return sd

    monkeypatch.setattr(weights_out, "torchvision_layout", off_by_one_bias)
    with pytest.raises(UserError, match=r"^torchvision strict=True does not give the model's outputs back: max abs "
                                        r"difference 1 on a random batch of 3 \(limit .*\); nothing kept$"):
        export_checkpoint(str(run), fmt="torchvision")
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors"]
