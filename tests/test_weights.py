"""Released checkpoints load everywhere: state dicts fabricated (random weights) in each source's key
layout load, and the loaded model computes what the source-layout model computes with them; the
CLI takes them (--weights, model.weights); model.pretrained uses timm's / torchvision's caches and
fails in one line when offline without them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from visionzoo.cli import main
from visionzoo.config import ModelConfig, load_config
from visionzoo.errors import UserError
from visionzoo.models import build_model, create, model_args
from visionzoo.models.weights import model_from_weights, read_file

# dino_fashion_mnist's ViT (27 px grey crops, 9 px patches), as the DINO reference would build it.
VIT_KW = {"img_size": 27, "patch_size": 9, "embed_dim": 96, "depth": 4, "num_heads": 3}
# The recipe's feature is its mean patch token (timm's fc_norm); DINO's ViT reads [CLS] (norm).
CLS = "model.kwargs.global_pool=token"


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and float buffer drawn at random (matrices and kernels at a 1/sqrt(fan-in)
    scale, so that deep nets keep their signal): nothing passes by coincidence of the init."""
    g = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        for name, t in named:
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim >= 2 and t.shape[0] > 1:
                t.copy_(noise / (t[0].numel() ** 0.5))
            elif name.endswith("weight") and t.ndim == 1:  # norm gains
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    return model.eval()


def _reference_vit(seed: int, num_classes: int = 0) -> nn.Module:
    """DINO's ViT layout (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,
    norm2,mlp.fc1,mlp.fc2}, norm): timm's VisionTransformer names its tensors the same way."""
    return _randomise(timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=num_classes, **VIT_KW), seed)


def _dino_images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 27, 27, generator=torch.Generator().manual_seed(1))


class ReferenceDINOHead(nn.Module):
    """dino vision_transformer.py ``DINOHead``'s tensors: mlp.0/2/4 Linear layers with GELU between,
    then L2 normalisation and last_layer under nn.utils.weight_norm, stored as weight_g (the gain,
    [out, 1]) and weight_v (the direction, [out, bottleneck]); weight = g * v / ||v|| per row."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        _randomise(self.mlp, seed)
        self.weight_g = torch.rand(out_dim, 1, generator=g) + 0.5
        self.weight_v = torch.randn(out_dim, bottleneck, generator=g)

    def state(self, prefix: str) -> dict:
        sd = {f"{prefix}mlp.{k}": v for k, v in self.mlp.state_dict().items()}
        return {**sd, f"{prefix}last_layer.weight_g": self.weight_g, f"{prefix}last_layer.weight_v": self.weight_v}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.normalize(self.mlp(x), dim=-1) @ w.T


def _dino_full_checkpoint(path: Path) -> tuple[nn.Module, nn.Module, ReferenceDINOHead]:
    """main_dino.py's checkpoint.pth: student (DDP: module.), teacher, optimizer, epoch, args
    (an argparse.Namespace), dino_loss; each network is backbone.* + head.*."""
    teacher, student = _reference_vit(10), _reference_vit(11)
    head = ReferenceDINOHead(96, 64, 32, 16, seed=12)
    torch.save({
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **head.state("module.head.")},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head.state("head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]}, "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }, path)
    return teacher, student, head


# ----------------------------------------------------------------------------- DINO

def test_dino_released_backbone_loads_into_the_recipe_model(tmp_path: Path) -> None:
    ref = _reference_vit(0)
    torch.save(ref.state_dict(), tmp_path / "dino_vittiny_pretrain.pth")  # *_pretrain.pth: the bare backbone
    cfg = load_config("dino_fashion_mnist", [CLS])
    model, args = model_from_weights(cfg.model, tmp_path / "dino_vittiny_pretrain.pth", 0, 1)
    x = _dino_images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)
    assert args["num_classes"] == 0 and args["vit_pos_embed"] == "dino"


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_dino_training_checkpoint_network_by_key(tmp_path: Path, key: str) -> None:
    teacher, student, _ = _dino_full_checkpoint(tmp_path / "checkpoint.pth")
    cfg = load_config("dino_fashion_mnist", [f"model.checkpoint_key={key}", CLS])
    model, _ = model_from_weights(cfg.model, tmp_path / "checkpoint.pth", 0, 1)
    x = _dino_images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), (teacher if key == "teacher" else student)(x), rtol=0, atol=0)


def test_dino_training_checkpoint_initialises_student_and_teacher_with_the_head(tmp_path: Path) -> None:
    from visionzoo.engine.tasks.dino import build_student_teacher

    teacher, _, head = _dino_full_checkpoint(tmp_path / "checkpoint.pth")
    cfg = load_config("dino_fashion_mnist", [f"model.weights={tmp_path / 'checkpoint.pth'}", "dino.out_dim=64",
                                             "dino.hidden_dim=32", "dino.bottleneck_dim=16", CLS])
    student, dino_teacher, _ = build_student_teacher(cfg, torch.device("cpu"), ddp=False)
    x = _dino_images()
    with torch.no_grad():
        expected = head(teacher(x))  # the reference's teacher: backbone [CLS] -> DINOHead
        for net in (student, dino_teacher):
            torch.testing.assert_close(net.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_dino_head_of_another_shape_is_one_line(tmp_path: Path) -> None:
    from visionzoo.engine.tasks.dino import build_student_teacher

    _dino_full_checkpoint(tmp_path / "checkpoint.pth")
    cfg = load_config("dino_fashion_mnist", [f"model.weights={tmp_path / 'checkpoint.pth'}", "dino.out_dim=128",
                                             "dino.hidden_dim=32", "dino.bottleneck_dim=16", CLS])
    with pytest.raises(UserError, match=r"DINO head .* 2 of another shape \(last_layer"):
        build_student_teacher(cfg, torch.device("cpu"), ddp=False)


# ----------------------------------------------------------------------------- timm, torchvision, mmcls

VIT_CFG = ModelConfig(name="vit_tiny_patch16_224", library="timm", kwargs=VIT_KW)


@pytest.mark.parametrize("layout", ["pth", "train_checkpoint_bin", "safetensors"])
def test_timm_state_dicts(tmp_path: Path, layout: str) -> None:
    ref = _reference_vit(3, num_classes=10)
    sd = ref.state_dict()
    if layout == "pth":
        path = tmp_path / "vit.pth"
        torch.save(sd, path)
    elif layout == "train_checkpoint_bin":  # timm train.py's checkpoint: DDP names, args, numpy metric
        path = tmp_path / "pytorch_model.bin"
        torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1), "metric": np.float64(71.5),
                    "version": 2}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    model, _ = model_from_weights(VIT_CFG, path, 10, 1)
    x = _dino_images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def test_fine_tuning_to_another_class_count_reinitialises_the_classifier(tmp_path: Path, capsys) -> None:
    ref = _reference_vit(4, num_classes=10)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    model, _ = model_from_weights(VIT_CFG, tmp_path / "vit.pth", 5, 1, allow_new_classifier=True)
    assert "classifier 'head' re-initialised for 5 classes" in capsys.readouterr().out
    x = _dino_images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_head(model.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), rtol=0, atol=0)
    assert model.head.out_features == 5
    with pytest.raises(UserError, match="has 10 classes, the model here 5"):  # evaluation: no new classifier
        model_from_weights(VIT_CFG, tmp_path / "vit.pth", 5, 1)


def test_torchvision_state_dicts_including_densenet_old_names(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for name in ("resnet18", "densenet121"):
        ref = _randomise(torchvision.models.get_model(name, num_classes=10), 5)
        sd = ref.state_dict()
        if name == "densenet121":  # torchvision's released DenseNet files: denselayerN.norm.1.weight ...
            sd = {k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.").replace(".relu1.", ".relu.1.")
                  .replace(".norm2.", ".norm.2.").replace(".conv2.", ".conv.2.") if "denselayer" in k else k: v
                  for k, v in sd.items()}
            assert "features.denseblock1.denselayer1.norm.1.weight" in sd
        torch.save(sd, tmp_path / f"{name}.pth")
        model, _ = model_from_weights(ModelConfig(name=name, library="torchvision"), tmp_path / f"{name}.pth", 10, 3)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def test_mmcls_checkpoint_into_resnet50_cifar100(tmp_path: Path) -> None:
    # mmcls ImageClassifier(ResNet_CIFAR, GlobalAveragePooling, LinearClsHead): backbone.conv1,
    # backbone.bn1, backbone.layerN.M.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1},
    # head.fc; the same layers as torchvision's ResNet with the CIFAR stem.
    ref = _randomise(create(model_args(load_config("resnet50_cifar100").model, 100, 3)), 6)
    sd = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in ref.state_dict().items()}
    assert {"backbone.bn1.running_var", "backbone.layer1.0.bn3.weight", "backbone.layer2.0.downsample.1.weight",
            "head.fc.bias"} <= set(sd)
    torch.save({"meta": {"mmcls_version": "0.24.0", "epoch": 200, "CLASSES": [f"c{i}" for i in range(100)],
                         "hook_msgs": {"best_score": np.float64(80.1)}}, "state_dict": sd}, tmp_path / "epoch_200.pth")
    cfg = load_config("resnet50_cifar100", [f"model.weights={tmp_path / 'epoch_200.pth'}"])
    model, _ = build_model(cfg.model, 100, 3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def test_mismatched_weights_are_one_line_with_counts_and_names(tmp_path: Path, capsys) -> None:
    sd = _reference_vit(7).state_dict()
    sd.pop("norm.weight")
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"1 missing \(norm.weight\); 1 unexpected \(blocks.9.attn.qkv.weight\)"):
        model_from_weights(load_config("dino_fashion_mnist", [CLS]).model, tmp_path / "broken.pth", 0, 1)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    assert main(["knn", "--weights", str(tmp_path / "junk.pth"), "--recipe", "dino_fashion_mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"visionzoo: error: {tmp_path / 'junk.pth'} is a text file, not a checkpoint: "
                   "pass a .pth/.pt/.bin/.safetensors weights file")


def test_pickled_code_is_refused(tmp_path: Path, capsys) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"holds a pickled 'print', which would run code from the file") as err:
        model_from_weights(VIT_CFG, tmp_path / "evil.pth", 10, 1)
    assert "ran code" not in capsys.readouterr().out
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


def _other_files(tmp_path: Path) -> dict[str, bytes]:
    sd = {"w": torch.zeros(1000)}
    torch.save(sd, tmp_path / "good.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    good, legacy = (tmp_path / "good.pth").read_bytes(), (tmp_path / "legacy.pth").read_bytes()
    return {"afile.txt": b"accuracy 71.5\nloss 1.2\n", "empty.pth": b"", "cut.pth": good[:len(good) // 2],
            "cut_legacy.pth": legacy[:len(legacy) // 2], "photo.pth": b"\x89PNG\r\n\x1a\n" + bytes(range(256))}


@pytest.mark.parametrize("name, words", [
    ("afile.txt", "is a text file, not a checkpoint"),
    ("empty.pth", "is empty, not a checkpoint"),
    ("cut.pth", "is truncated or damaged"),
    ("cut_legacy.pth", "is truncated or damaged"),
    ("photo.pth", "is not a checkpoint: neither a PyTorch file"),
])
def test_unreadable_weights_say_what_the_file_is(tmp_path: Path, capsys, name, words) -> None:
    (tmp_path / name).write_bytes(_other_files(tmp_path)[name])
    assert main(["eval", "--weights", str(tmp_path / name), "--recipe", "fashion_mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"visionzoo: error: {tmp_path / name} {words}") and err.count("\n") == 1, err


def _numpy1_pickle(obj) -> bytes:
    """``obj`` as torch.save's legacy (flat pickle) format writes it, with NumPy 1.x's module
    names: NumPy 2 pickles ``numpy._core.multiarray.scalar``, NumPy 1.x wrote ``numpy.core...``."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False, pickle_protocol=2)
    data = buf.getvalue()
    assert b"numpy._core.multiarray\n" in data
    return data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def test_numpy1_checkpoints_load_and_code_stays_refused(tmp_path: Path) -> None:
    """An mmcls/timm training checkpoint pickled under NumPy 1.x: scalars, an array and dtypes in
    its metadata load; a pickled function under a numpy.core name is still refused."""
    sd = _reference_vit(8).state_dict()
    meta = {"best_score": np.float64(80.1), "epoch": np.int64(200), "hist": np.arange(4.0), "dt": np.dtype("float32")}
    (tmp_path / "np1.pth").write_bytes(_numpy1_pickle({"meta": meta, "state_dict": sd}))
    obj, _ = read_file(tmp_path / "np1.pth")
    assert obj["meta"]["best_score"] == 80.1 and obj["meta"]["epoch"] == 200
    assert obj["meta"]["hist"].tolist() == [0.0, 1.0, 2.0, 3.0] and obj["meta"]["dt"] == np.dtype("float32")
    assert torch.equal(obj["state_dict"]["pos_embed"], sd["pos_embed"])
    # The NumPy 1.x names are allowed for the harmless builders only, not for any numpy.core function.
    evil = _numpy1_pickle({"x": np.float64(1.0)}).replace(b"numpy.core.multiarray\nscalar\n",
                                                          b"numpy.core.multiarray\nset_string_function\n")
    (tmp_path / "evil_np1.pth").write_bytes(evil)
    with pytest.raises(UserError, match="numpy.core.multiarray.set_string_function"):
        read_file(tmp_path / "evil_np1.pth")


# ----------------------------------------------------------------------------- the CLI end to end

def test_knn_linear_eval_export_with_weights_and_recipe(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    ref = _reference_vit(8)
    torch.save(ref.state_dict(), tmp_path / "dino_backbone.pth")
    common = ["--data", str(fmnist_dir), "--device", "cpu", "--amp", "none", "log.progress=off"]
    dino = [*common, CLS]
    assert main(["knn", "--weights", str(tmp_path / "dino_backbone.pth"), "--recipe", "dino_fashion_mnist",
                 *dino, "dino.knn_k=[5]"]) == 0
    out = capsys.readouterr().out
    assert "dino_backbone.pth: weighted k-NN" in out and "5-NN: Top1" in out
    assert main(["linear", "--weights", str(tmp_path / "dino_backbone.pth"), "--recipe", "dino_fashion_mnist",
                 *dino, "--epochs", "1", "dino.linear_n_last_blocks=1"]) == 0
    # the last [CLS] token and (the recipe's dino.linear_avgpool) the mean patch token
    assert "linear probe (192 features, 1 epoch)" in capsys.readouterr().out
    _dino_full_checkpoint(tmp_path / "checkpoint.pth")
    assert main(["knn", "--weights", str(tmp_path / "checkpoint.pth"), "--checkpoint-key", "student",
                 "--recipe", "dino_fashion_mnist", *dino, "dino.knn_k=[5]"]) == 0
    assert "DINO training checkpoint, student" in capsys.readouterr().out
    onnx = tmp_path / "exported" / "dino.onnx"
    assert main(["export", "--weights", str(tmp_path / "dino_backbone.pth"), "--recipe", "dino_fashion_mnist",
                 "--output", str(onnx), CLS]) == 0
    side = json.loads(onnx.with_suffix(".json").read_text())
    assert side["output"]["kind"] == "features" and side["checkpoint"]["path"].endswith("dino_backbone.pth")

    cnn = _randomise(create(model_args(load_config("fashion_mnist").model, 10, 1)), 9)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pth")
    assert main(["eval", "--weights", str(tmp_path / "cnn.pth"), "--recipe", "fashion_mnist", *common]) == 0
    assert "cnn.pth: Acc@1" in capsys.readouterr().out
    assert main(["export", "--weights", str(tmp_path / "cnn.pth"), "--recipe", "fashion_mnist",
                 "--output", str(tmp_path / "exported")]) == 0
    side = json.loads((tmp_path / "exported" / "cnn.json").read_text())
    assert side["output"]["kind"] == "logits" and len(side["classes"]) == 10
    assert main(["knn", "--weights", str(tmp_path / "cnn.pth"), *common]) == 2  # no recipe, no run folder
    assert "--recipe" in capsys.readouterr().err


def test_train_initialises_from_model_weights_then_fine_tunes(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    # Weights of a 5-class small CNN: fine-tuned on the 10 Fashion-MNIST classes, the classifier anew.
    cnn = _randomise(create(model_args(load_config("fashion_mnist").model, 5, 1)), 13)
    torch.save({"state_dict": cnn.state_dict()}, tmp_path / "five.pth")
    run = tmp_path / "run"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--epochs", "1",
                 "--workers", "0", "--device", "cpu", "--amp", "none", "data.batch_size=32",
                 "train.max_steps_per_epoch=2", f"model.weights={tmp_path / 'five.pth'}"]) == 0
    out = capsys.readouterr().out
    assert "classifier 'fc' re-initialised for 10 classes (" in out and "five.pth" in out
    assert json.loads((run / "results.json").read_text())["Acc@1"] is not None


# ----------------------------------------------------------------------------- model.pretrained

def _hf_cache(root: Path, repo: str, sd: dict) -> None:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors (refs/main -> snapshot)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "snapshots" / commit / "model.safetensors")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails at once (as on a machine without network), and downloads fail the test."""
    import socket

    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))


def test_timm_pretrained_from_the_hub_cache_and_offline(tmp_path: Path, monkeypatch, capsys, no_network) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = ModelConfig(name="test_vit", library="timm", pretrained=True)
    with pytest.raises(UserError, match=r"timm's timm/test_vit.r160_in1k is not in the Hugging Face cache .*hub"):
        build_model(cfg, 1000, 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        build_model(cfg, 1000, 3)
    ref = _randomise(timm.create_model("test_vit"), 14)
    _hf_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", ref.state_dict())
    model, _ = build_model(cfg, 10, 3)  # another class count: timm drops the classifier
    assert "classifier re-initialised for 10 classes (the weights have 1000)" in capsys.readouterr().out
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), ref.forward_features(x), rtol=0, atol=0)


def test_torchvision_pretrained_from_the_torch_hub_cache_and_offline(tmp_path: Path, monkeypatch, capsys,
                                                                    no_network) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config("alexnet_imagenet", ["model.name=mobilenet_v3_small", "model.pretrained=true"]).model
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    with pytest.raises(UserError, match=f"not in {cached} and download.pytorch.org cannot be reached"):
        build_model(cfg, 1000, 3)
    assert main(["train", "alexnet_imagenet", "--data", "synthetic", "--batch-size", "8", "--workers", "0",
                 "--device", "cpu", "--output", str(tmp_path / "run"), "model.name=mobilenet_v3_small",
                 "model.pretrained=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visionzoo: error: model.pretrained:") and "\n" not in err
    ref = _randomise(torchvision.models.mobilenet_v3_small(), 15)
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    model, _ = build_model(cfg, 1000, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)
    build_model(cfg, 7, 3)
    assert "classifier 'classifier.3' re-initialised for 7 classes" in capsys.readouterr().out
    with pytest.raises(UserError, match="model.pretrained=true needs a timm or torchvision model"):
        build_model(load_config("fashion_mnist", ["model.pretrained=true"]).model, 10, 1)
