"""Export and offline inference: every supervised architecture family exports to ONNX and
matches PyTorch in ONNX Runtime; a trained Fashion-MNIST run gives the same accuracy through
``infer`` as through ``eval``; bad inputs end in one line and exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from conftest import pattern_images  # noqa: E402
from visionzoo.checkpoint import save_weights  # noqa: E402
from visionzoo.cli import main  # noqa: E402
from visionzoo.commands.export import ExportOptions, export_checkpoint, sidecar_path  # noqa: E402
from visionzoo.config import load_config, to_dict  # noqa: E402
from visionzoo.errors import UserError  # noqa: E402
from visionzoo.models import build_model  # noqa: E402

# (recipe, overrides): one tiny case per architecture family; test_resize > test_size so the
# eval crop path is the one exported. dm_nfnet_f0 keeps its blocks (scaled weight-standardised
# convs, SE, gamma activations) but one per stage, to stay within seconds on two CPU cores.
FAMILIES = {
    "alexnet": ("alexnet_imagenet", ["data.test_resize=73", "data.test_size=64"]),
    "densenet121": ("densenet201_imagenet", ["model.name=densenet121", "data.test_resize=36", "data.test_size=32"]),
    "cifar_resnet18": ("resnet50_cifar100", ["model.name=cifar_resnet18"]),
    "cifar_resnet50": ("resnet50_cifar100", []),
    "dm_nfnet_f0": ("nfnet_f0_imagenet", ["data.test_resize=73", "data.test_size=64", "model.kwargs.depths=[1,1,1,1]"]),
    "vit_small_patch16_224": ("alexnet_imagenet", [
        "model.library=timm", "model.name=vit_small_patch16_224", "model.kwargs.img_size=32",
        "data.test_resize=36", "data.test_size=32"]),
}


def make_checkpoint(run: Path, recipe: str, overrides: list[str], classes: list[str] | None = None) -> Path:
    """A run folder with a random-init model.safetensors carrying the metadata training writes."""
    cfg = load_config(recipe, overrides)
    classes = classes or [f"class_{i}" for i in range(10)]
    net, args = build_model(cfg.model, len(classes), cfg.data.in_chans)
    run.mkdir(parents=True, exist_ok=True)
    meta = {"config": to_dict(cfg), "model": args, "classes": classes, "epoch": 0, "acc1": None}
    save_weights(run / "model.safetensors", net, meta)
    return run


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_with_onnxruntime_parity(tmp_path: Path, family: str) -> None:
    import onnxruntime as ort

    recipe, overrides = FAMILIES[family]
    run = make_checkpoint(tmp_path / family, recipe, overrides)
    side = export_checkpoint(str(run))
    onnx_file = run / "model.onnx"
    assert onnx_file.is_file() and sidecar_path(onnx_file) == run / "model.json"
    on_disk = json.loads((run / "model.json").read_text())
    assert on_disk == json.loads(json.dumps(side))
    size = 64 if family in ("alexnet", "dm_nfnet_f0") else 32
    assert side["input"]["shape"] == ["batch", 3, size, size]
    assert side["parity"]["max_abs_diff"] <= side["parity"]["limit"]
    assert side["checkpoint"]["sha256"] and side["classes"] == [f"class_{i}" for i in range(10)]
    assert side["preprocess"]["input_size"] == size and side["recipe"] == recipe
    # The batch axis is dynamic: any batch size runs.
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": np.zeros((5, 3, size, size), np.float32)})[0]
    assert out.shape == (5, 10)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_other_formats_export_with_parity(tmp_path: Path, fmt: str) -> None:
    run = make_checkpoint(tmp_path / "run", "fashion_mnist", [])
    side = export_checkpoint(str(run), fmt=fmt, output=str(tmp_path / "out"))
    suffix = {"torchscript": ".torchscript.pt", "pt2": ".pt2"}[fmt]
    assert (tmp_path / "out" / f"model{suffix}").is_file()
    assert (tmp_path / "out" / f"model{suffix}.json").is_file()
    assert side["format"] == fmt and side["parity"]["max_abs_diff"] <= side["parity"]["limit"]


def test_parity_failure_is_a_user_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    run = make_checkpoint(tmp_path / "run", "fashion_mnist", [])
    # A negative tolerance cannot be met: the check must refuse and leave no model behind. (The
    # command line refuses it before exporting; the function is called with it directly.)
    assert main(["export", str(run), "--tolerance", "-1"]) == 2
    assert "--tolerance -1.0 is out of range (must be > 0)" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not match PyTorch"):
        export_checkpoint(str(run), options=ExportOptions(tolerance=-1.0))
    assert not (run / "model.onnx").exists() and not (run / "model.json").exists()
    assert not list(run.glob(".model.onnx.*"))  # the temporary file is gone too
    assert main(["export", str(run), "--opset", "99"]) == 2
    assert "--opset 99" in capsys.readouterr().err


# ---------------------------------------------------------------- Fashion-MNIST end to end


def test_train_export_infer_matches_eval(tmp_path: Path, fmnist_dir: Path, capsys) -> None:
    run = tmp_path / "run"
    # The test images are stripe textures at random phases: they need the small CNN's global
    # pooling (the demo's classifier over the 7x7 map is for centred objects such as clothes).
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", "--batch-size", "32",
                 "--output", str(run), "model.kwargs={width: 16}"]) == 0
    # fp32 like ONNX Runtime (train.amp=auto evaluates in bf16 on CPUs with avx512_bf16/AMX).
    assert main(["eval", str(run), "--data", str(fmnist_dir), "--amp", "none"]) == 0
    eval_acc1 = float(re.findall(r"Acc@1 ([\d.]+)%", capsys.readouterr().out)[-1])
    assert eval_acc1 > 20.0  # the classes are easy: a single epoch learns something

    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and (run / "model.onnx").is_file() and (run / "model.json").is_file()

    assert main(["infer", str(run / "model.onnx"), "--data", str(fmnist_dir), "--batch-size", "64"]) == 0
    result = json.loads((run / "model.infer.json").read_text())
    assert result["samples"] == 200
    assert abs(result["acc1"] - eval_acc1) <= 0.1
    assert result["images_per_s"] > 0 and result["ms_per_image"] > 0
    capsys.readouterr()

    # One test image as a PNG: infer names one of the Fashion-MNIST classes, first the right one
    # when the model has learned it.
    image = pattern_images(np.array([1]), 28, 1, seed=5)[0]
    Image.fromarray(image, mode="L").save(tmp_path / "trouser.png")
    Image.fromarray(np.stack([image] * 3, -1)).resize((56, 56)).save(tmp_path / "big_rgb.jpg")
    assert main(["infer", str(run / "model.onnx"), str(tmp_path / "trouser.png"), str(tmp_path / "big_rgb.jpg"),
                 "--output", str(tmp_path / "pred.json")]) == 0
    printed = capsys.readouterr().out
    names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert any(n in printed for n in names)
    written = json.loads((tmp_path / "pred.json").read_text())
    assert (written["classified"], written["bad_images"], written["skipped"]) == (2, 0, [])
    preds = written["images"]
    assert len(preds) == 2 and len(preds[0]["top"]) == 5
    assert abs(sum(p["prob"] for p in preds[0]["top"]) - 1.0) < 0.05
    assert "resized" in preds[1]["note"]


def test_imagefolder_infer_matches_eval(tmp_path: Path, capsys) -> None:
    """The resize + centre-crop path: JPEG/PNG files of odd sizes, one of them unreadable."""
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "fox"]
    for split in ("train", "val"):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                img = Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8))
                img.save(tmp_path / "data" / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "data" / "val" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    run = make_checkpoint(tmp_path / "run", "alexnet_imagenet", [
        "model.library=visionzoo", "model.name=small_cnn", "model.kwargs.width=8", "data.workers=0",
        "data.test_resize=36", "data.test_size=32", "data.interpolation=bicubic", f"data.path={tmp_path / 'data'}"],
        classes=classes)
    assert main(["eval", str(run)]) == 0
    eval_acc1 = float(re.findall(r"Acc@1 ([\d.]+)%", capsys.readouterr().out)[-1])
    assert main(["export", str(run)]) == 0
    assert main(["infer", str(run / "model.onnx"), "--output", str(tmp_path / "acc.json")]) == 0
    result = json.loads((tmp_path / "acc.json").read_text())
    assert result["samples"] == 12 and result["bad_images"] == 1
    assert abs(result["acc1"] - eval_acc1) <= 0.1
    capsys.readouterr()
    assert main(["infer", str(run / "model.onnx"), "--strict"]) == 2  # --strict: the bad file ends it
    broken = tmp_path / "data" / "val" / "dog" / "broken.jpg"
    assert capsys.readouterr().err == f"visionzoo: error: cannot decode image {broken} (--strict)\n"
    assert main(["infer", str(run / "model.onnx"), str(tmp_path / "data" / "val" / "fox" / "1.png")]) == 0
    out = capsys.readouterr().out  # a random-init model: any class, but five of them, named
    assert sum(f"%  {c}" in out for c in classes) == 3


def test_dino_exports_its_backbone_as_features(tmp_path: Path, fmnist_dir: Path, capsys) -> None:
    """A DINO run exports the teacher backbone: [batch, dim] features, said in the sidecar;
    infer refuses it with a pointer to knn/linear instead of printing meaningless classes."""
    run = tmp_path / "dino"
    assert main(["train", "dino_fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "train.epochs=0",
                 "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, "
                 "dynamic_img_size: true}",
                 "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[5]",
                 "dino.knn_report_k=5"]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    assert "DINO teacher backbone: [CLS] features of 24 dims" in capsys.readouterr().out
    side = json.loads((run / "model.json").read_text())
    assert side["output"] == {"name": "features", "kind": "features", "shape": ["batch", 24]}
    assert side["parity"]["max_abs_diff"] <= side["parity"]["limit"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "features"
    feats = session.run(None, {"images": np.zeros((5, 1, 27, 27), np.float32)})[0]
    assert feats.shape == (5, 24)
    _one_line_error(capsys, main(["infer", str(run / "model.onnx"), "x.png"]), "DINO backbone", "visionzoo knn")


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A small random-init Fashion-MNIST model exported to ONNX."""
    run = make_checkpoint(tmp_path_factory.mktemp("exported") / "run", "fashion_mnist", [])
    export_checkpoint(str(run))
    return run / "model.onnx"


def _one_line_error(capsys, code: int, *words: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("visionzoo: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_not_an_onnx_file(tmp_path: Path, exported: Path, capsys) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a model\n")
    (tmp_path / "model.json").write_text(sidecar_path(exported).read_text())
    _one_line_error(capsys, main(["infer", str(fake), "--data", "synthetic"]), "not an ONNX model")
    # Without a sidecar next to it, a text file is still said to be no model (not a missing sidecar).
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["infer", str(notes), "img.png"]) == 2
    assert capsys.readouterr().err == (f"visionzoo: error: {notes} is not an ONNX model: visionzoo infer runs the "
                                       f"model.onnx that visionzoo export writes (with its model.json sidecar beside "
                                       f"it)\n")


def test_missing_sidecar(tmp_path: Path, exported: Path, capsys) -> None:
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes(exported.read_bytes())
    _one_line_error(capsys, main(["infer", str(lonely), "x.png"]), "no sidecar model.json")


def test_sidecar_that_does_not_match(tmp_path: Path, exported: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(exported.read_bytes())
    side = json.loads(sidecar_path(exported).read_text())
    side["classes"] = side["classes"][:7]
    (tmp_path / "model.json").write_text(json.dumps(side))
    _one_line_error(capsys, main(["infer", str(model), "x.png"]), "does not match", "7 classes")
    side = json.loads(sidecar_path(exported).read_text())
    side["input"]["shape"] = ["batch", 3, 28, 28]
    (tmp_path / "model.json").write_text(json.dumps(side))
    _one_line_error(capsys, main(["infer", str(model), "x.png"]), "does not match")


def test_undecodable_and_missing_images(tmp_path: Path, exported: Path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _one_line_error(capsys, main(["infer", str(exported), str(bad)]), "cannot decode image")  # nothing else to do
    _one_line_error(capsys, main(["infer", str(exported), str(tmp_path / "nope.png")]), "image not found")
    _one_line_error(capsys, main(["infer", str(tmp_path / "absent.onnx"), "--data", "x"]), "model not found")
    _one_line_error(capsys, main(["infer", str(exported), str(bad), "--data", "x"]), "not both")


def test_infer_takes_a_folder_of_images_and_says_what_it_does_without_input(tmp_path: Path, exported: Path,
                                                                            fmnist_dir: Path, monkeypatch,
                                                                            capsys) -> None:
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for i, where in enumerate((photos, photos / "more")):
        Image.fromarray(pattern_images(np.array([i]), 28, 1, i)[0]).save(where / f"shoe{i}.png")
    assert main(["infer", str(exported), str(photos)]) == 0
    out = capsys.readouterr().out
    assert f"{photos} is a folder: classifying its 2 images" in out
    assert f"{photos / 'shoe0.png'}:" in out and f"{photos / 'more' / 'shoe1.png'}:" in out
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, main(["infer", str(exported), str(tmp_path / "empty")]), "folder with no images",
                    f"--data {tmp_path / 'empty'}")
    # A model exported from a run whose data path was relative: the sidecar records it absolute,
    # so infer with no input works from another directory, and says what it measures.
    monkeypatch.chdir(fmnist_dir.parent)
    from visionzoo.data.loading.build import build_datasets

    rel = [f"data.path={fmnist_dir.name}", "data.workers=0"]
    classes = build_datasets(load_config("fashion_mnist", rel).data, train=False).classes
    run = make_checkpoint(tmp_path / "rel", "fashion_mnist", rel, classes=classes)
    export_checkpoint(str(run))
    assert json.loads((run / "model.json").read_text())["data"]["path"] == str(fmnist_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(run / "model.onnx"), "--output", str(tmp_path / "acc.json")]) == 0
    out = capsys.readouterr().out
    assert f"no images and no --data given: measuring accuracy on the validation split of the data the model " \
           f"was trained on ({fmnist_dir.resolve()})" in out
    assert json.loads((tmp_path / "acc.json").read_text())["samples"] == 200


def test_infer_skips_an_undecodable_image_names_and_counts_it(tmp_path: Path, exported: Path, capsys) -> None:
    """A folder with one bad file among good ones: the others are classified, the bad one named on
    stderr, counted in the summary line and the JSON; exit 0. --strict stops at it (exit 2)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(pattern_images(np.array([i]), 28, 1, i)[0]).save(photos / f"{i}.png")
    bad = photos / "1b_notanimage.jpg"
    bad.write_bytes(b"not a jpeg at all")
    out_json = tmp_path / "pred.json"
    assert main(["infer", str(exported), str(photos), "--output", str(out_json)]) == 0
    out, err = capsys.readouterr()
    reason = "cannot identify image file " + repr(str(bad))
    assert err == f"visionzoo: skipped: cannot decode image {bad}: {reason}\n"
    assert out.splitlines()[-1] == (f"{exported}: 3 image(s) classified, 1 unreadable skipped ({bad}) "
                                    f"| results {out_json}")
    written = json.loads(out_json.read_text())
    assert (written["classified"], written["bad_images"]) == (3, 1)
    assert written["skipped"] == [{"image": str(bad), "error": f"cannot decode image {bad}: {reason}"}]
    assert [r["image"] for r in written["images"]] == [str(photos / f"{i}.png") for i in range(3)]
    assert main(["infer", str(exported), str(photos), "--strict"]) == 2
    out, err = capsys.readouterr()
    assert err == f"visionzoo: error: cannot decode image {bad}: {reason}\n"
    assert f"{photos / '0.png'}:" in out and f"{photos / '2.png'}:" not in out  # stopped at the bad file


def test_eval_of_a_folder_that_is_not_a_run_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    assert main(["eval", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"visionzoo: error: {folder} is not a run folder: a run folder (written by visionzoo train) holds "
        f"config.yaml, metrics.jsonl and model.safetensors; give one, a .safetensors checkpoint, or --weights FILE "
        f"--recipe NAME\n")
    (folder / "config.yaml").write_text("recipe: fashion_mnist\n")  # a run killed before its first checkpoint
    assert main(["eval", str(folder)]) == 2
    assert capsys.readouterr().err == (f"visionzoo: error: {folder} has no model.safetensors yet: the run writes it "
                                       f"with its first checkpoint\n")
