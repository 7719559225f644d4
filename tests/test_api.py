"""The Python API: recipes, load_recipe, train, load, predict; and `import visionzoo` stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visionzoo
from conftest import StopAfter
from visionzoo.cli import main
from visionzoo.errors import Stopped, UserError


def test_import_is_light_and_the_api_lazy():
    code = ("import sys, visionzoo; assert 'torch' not in sys.modules, 'torch imported'; "
            "f = visionzoo.load_recipe; assert 'torch' not in sys.modules; print(callable(f))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    with pytest.raises(AttributeError):
        _ = visionzoo.no_such_function


def test_recipes_and_overrides():
    names = visionzoo.recipes()
    assert "fashion_mnist" in names and "dino_vits16_imagenet" in names
    cfg = visionzoo.load_recipe("fashion_mnist", "train.seed=3", optim={"lr": 0.5, "nesterov": False},
                                data__batch_size=16, epochs=2, model__kwargs={"width": 8})
    got = (cfg.optim.lr, cfg.optim.nesterov, cfg.data.batch_size, cfg.train.epochs, cfg.train.seed)
    assert got == (0.5, False, 16, 2, 3)
    assert cfg.model.kwargs == {"width": 8}
    with pytest.raises(UserError, match="optim.lr"):
        visionzoo.load_recipe("fashion_mnist", optim__lrr=0.1)


def test_train_load_predict_equals_eval(fmnist_dir, tmp_path, capsys):
    run = visionzoo.train("fashion_mnist", data=str(fmnist_dir), output=str(tmp_path / "run"), epochs=1, device="cpu",
                          amp="none", data__batch_size=32, train__max_steps_per_epoch=4, log__progress="off")
    assert run.path == tmp_path / "run" and run.results["steps"] == 4 and (run.path / "results.json").is_file()
    model, preprocess, classes = visionzoo.load(run)
    assert classes[0] == "T-shirt/top" and not model.training

    from visionzoo.data.sources.idx import load_idx_split

    images, labels = load_idx_split(str(fmnist_dir), False)
    # The batches eval makes (data.batch_size=32, in order): the same numbers on any CPU.
    top = visionzoo.predict(run, [torch.from_numpy(im) for im in images], topk=3, batch_size=32)
    assert len(top) == len(labels) and len(top[0]) == 3
    assert top[0][0]["prob"] >= top[0][1]["prob"] >= top[0][2]["prob"]
    acc = 100 * np.mean([t[0]["index"] == y for t, y in zip(top, labels, strict=True)])
    capsys.readouterr()
    assert main(["eval", str(run.path), "--data", str(fmnist_dir), "--device", "cpu", "--amp", "none"]) == 0
    assert f"Acc@1 {acc:.2f}%" in capsys.readouterr().out
    assert acc == pytest.approx(run.results["Acc@1"])

    # PIL images and files go through the same preprocessing as tensors.
    path = tmp_path / "img.png"
    Image.fromarray(images[0]).save(path)
    same = visionzoo.predict((model, preprocess, classes), [Image.fromarray(images[0]), str(path)], topk=1)
    assert same[0] == same[1] and same[0][0]["index"] == top[0][0]["index"]
    batch = torch.stack([preprocess(torch.from_numpy(images[1]))])
    loaded = visionzoo.load(run.path / "model.safetensors")
    assert visionzoo.predict(loaded, batch, topk=1)[0][0]["index"] == top[1][0]["index"]
    assert run.report(max_images=2).is_file()

    # Released weights (a plain state dict) in a recipe's model: the same predictions.
    torch.save(model.state_dict(), tmp_path / "released.pth")
    for recipe in (str(run.path / "config.yaml"), run.config):
        loaded = visionzoo.load(tmp_path / "released.pth", recipe=recipe)
        assert loaded.classes == classes
        assert visionzoo.predict(loaded, batch, topk=1)[0][0]["index"] == top[1][0]["index"]


def test_train_on_two_processes_returns_the_run(fmnist_dir, tmp_path):
    """devices=2 goes through the CLI's local launcher and comes back (it used to exit the caller)."""
    run = visionzoo.train("fashion_mnist", data=str(fmnist_dir), devices=2, output=str(tmp_path / "ddp"), epochs=1,
                          device="cpu", amp="none", data__batch_size=32, train__max_steps_per_epoch=2,
                          log__progress="off")
    assert run.path == tmp_path / "ddp" and run.results["devices"] == 2 and run.results["steps"] == 2


def test_train_resume_continues_as_the_cli_does(fmnist_dir, tmp_path, monkeypatch, capsys):
    """visionzoo.train(..., resume="auto" | RUN) goes through the CLI's resume logic (engine/resume.py
    plan_resume): a run stopped mid-way continues exactly; a finished one is returned as it is."""
    from safetensors.torch import load_file

    import visionzoo.engine.run as run_engine

    kw = dict(data=str(fmnist_dir), epochs=2, device="cpu", amp="none", data__batch_size=64,
              train__checkpoint_every_steps=3, log__progress="off")
    ref = visionzoo.train("fashion_mnist", output=str(tmp_path / "ref"), **kw)

    with monkeypatch.context() as m:
        m.setattr(run_engine, "StopSignal", StopAfter(4))
        with pytest.raises(Stopped):
            visionzoo.train("fashion_mnist", output=str(tmp_path / "run"), **kw)
    capsys.readouterr()
    run = visionzoo.train("fashion_mnist", output=str(tmp_path / "run"), resume="auto", **kw)
    assert f"--resume auto: continuing {tmp_path / 'run'}" in capsys.readouterr().out
    a, b = load_file(str(ref.path / "model.safetensors")), load_file(str(run.path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and run.results["steps"] == ref.results["steps"] == 20
    again = visionzoo.train("fashion_mnist", resume=run.path, **kw)  # finished: nothing to do
    assert again.path == run.path and again.results == run.results
    assert "has finished; nothing to resume" in capsys.readouterr().out


def test_predict_infer_and_eval_preprocess_alike(tmp_path, capsys):
    """A recipe that evaluates at the stored size (test_resize=0, 32 px): a 112x112 PNG reaches
    the model through predict exactly as through infer (same input tensor, same top-1), images of
    mixed sizes work in predict and in eval's loader (they used to raise 'stack expects ...')."""
    pytest.importorskip("onnxruntime")
    from visionzoo.checkpoint import save_weights
    from visionzoo.commands.export import export_checkpoint
    from visionzoo.commands.infer import predict_images, preprocess_image
    from visionzoo.config import load_config, to_dict
    from visionzoo.models import build_model

    rng = np.random.default_rng(0)
    classes, sizes = ["ant", "bee", "cat"], [(32, 32), (112, 112), (50, 70)]
    for split in ("train", "val"):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for w, h in sizes:
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{w}x{h}.png")
    cfg = load_config("resnet50_cifar100", ["data.name=imagefolder", f"data.path={tmp_path / 'data'}",
                                            "data.workers=0", "data.batch_size=4", "model.library=visionzoo",
                                            "model.name=small_cnn", "model.kwargs.width=8", "train.device=cpu",
                                            "train.amp=none"])
    assert (cfg.data.test_resize, cfg.data.image_size) == (0, 32)
    torch.manual_seed(0)
    net, args = build_model(cfg.model, len(classes), 3)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "model.safetensors", net, {"config": to_dict(cfg), "model": args, "classes": classes,
                                                   "epoch": 0, "acc1": None})
    png = tmp_path / "data" / "val" / "bee" / "112x112.png"
    loaded = visionzoo.load(run)
    x = loaded.preprocess(str(png))
    assert x.shape == (3, 32, 32)
    export_checkpoint(str(run))
    infer_x, note = preprocess_image(png, cfg.data, 3, 32)
    assert note == "resized from 112x112" and torch.equal(x, torch.from_numpy(infer_x))
    capsys.readouterr()
    infer_top = predict_images(str(run / "model.onnx"), [str(png)])["images"][0]["top"][0]["class"]
    assert visionzoo.predict(loaded, [str(png)], topk=1)[0][0]["class"] == infer_top

    # Mixed sizes in one call: each as it would be alone; eval reads the same folder.
    files = sorted((tmp_path / "data" / "val").rglob("*.png"))
    together = visionzoo.predict(loaded, [str(f) for f in files], topk=1)
    assert together == [visionzoo.predict(loaded, [str(f)], topk=1)[0] for f in files]
    acc = 100 * np.mean([t[0]["class"] == f.parent.name for t, f in zip(together, files, strict=True)])
    assert main(["eval", str(run)]) == 0
    assert f"Acc@1 {acc:.2f}%" in capsys.readouterr().out


def test_train_in_python_returns_the_table_instead_of_printing_it(fmnist_dir, tmp_path, capsys):
    """In a notebook the CLI's end block (the table, "Final Performance ...") is noise: the Run
    holds it (``run.table``, shown as Markdown when a cell ends with the run); ``summary=True``
    prints it as the CLI does."""
    kw = dict(data=str(fmnist_dir), epochs=1, device="cpu", amp="none", data__batch_size=64,
              train__max_steps_per_epoch=2, log__progress="off")
    run = visionzoo.train("fashion_mnist", output=str(tmp_path / "quiet"), **kw)
    out = capsys.readouterr().out
    assert "Final Performance" not in out and "| recipe |" not in out and "epoch 1/1" in out
    assert run.table.splitlines()[0] == "| recipe | Acc@1 | FPS | devices | BN group | epochs | precision | torch |"
    assert f"| fashion_mnist | {run.results['Acc@1']:.2f} |" in run.table
    assert run._repr_markdown_() == f"`{run.path}`\n\n{run.table}"
    visionzoo.train("fashion_mnist", output=str(tmp_path / "loud"), summary=True, **kw)
    assert "Final Performance images/sec" in capsys.readouterr().out
