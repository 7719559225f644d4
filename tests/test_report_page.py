"""visionzoo report: the page of a short supervised run and of a DINO run, rendered in a real
headless Chromium; its numbers against `visionzoo eval` and direct computations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import inspect_page, require_chromium, screenshot
from visionzoo.cli import main
from visionzoo.html_report import metrics
from visionzoo.html_report.attention import POOLED_LABEL, cls_attention, feature_attention, mass_mask
from visionzoo.html_report.figures import CLS_ATTENTION
from visionzoo.html_report.predictions import CACHE, Predictions

FAST = ["--epochs", "1", "--device", "cpu", "--amp", "none", "log.progress=off"]
DINO_TINY = [
    "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true, "
    "global_pool: avg}",  # as the recipe: the feature pools the patch tokens
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=0",
    "data.batch_size=32", "train.max_steps_per_epoch=2", "train.log_every=1", "dino.knn_k=[5,20]",
]


@pytest.fixture(scope="module")
def browser() -> str:
    return require_chromium()


@pytest.fixture(scope="module")
def supervised_run(fmnist_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "fm"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *FAST,
                 "data.batch_size=32", "train.max_steps_per_epoch=4"]) == 0
    return run


def _check_page(browser: str, page: Path, tmp_path: Path, sections: set[str]) -> dict:
    found = inspect_page(browser, page, tmp_path / "profile")
    assert found["images"], "the page has no images"
    broken = [i["src"] for i in found["images"] if not i["naturalWidth"] > 0]
    assert not broken, f"images that did not load: {broken}"
    assert sections <= set(found["sections"]), found["sections"]
    assert found["errors"] == [], found["errors"]
    shot = screenshot(browser, page, tmp_path / "report.png", tmp_path / "profile")
    assert shot.stat().st_size > 10_000
    return found


def test_training_writes_the_cheap_page(supervised_run, browser, tmp_path):
    page = supervised_run / "report" / "index.html"
    assert page.is_file()
    text = page.read_text()
    assert "visionzoo report " in text and "confusion.png" not in text  # no model pass at the end of training
    _check_page(browser, page, tmp_path, {"curves", "results", "recipe", "environment", "more"})


def test_full_report_in_a_browser_and_cached(supervised_run, fmnist_dir, browser, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", str(supervised_run)]) == 0  # the page then shows parity and ONNX Runtime speed
    assert main(["infer", str(supervised_run / "model.onnx"), "--data", str(fmnist_dir)]) == 0
    capsys.readouterr()
    assert main(["report", str(supervised_run), "--max-images", "6"]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert page == supervised_run / "report" / "index.html"
    found = _check_page(browser, page, tmp_path,
                        {"curves", "results", "recipe", "environment", "predictions", "per-class", "confusion",
                         "mistakes", "calibration", "onnx"})
    text = page.read_text()
    assert "Parity with PyTorch" in text and "ONNX Runtime on the validation split" in text
    srcs = {i["src"] for i in found["images"]}
    assert {"curves.png", "confusion.png", "per_class.png", "reliability.png"} <= srcs
    assert {"mistakes.png", "unsure.png"} & srcs  # a 4-step model makes mistakes and is unsure
    pred = Predictions.load(supervised_run / CACHE)
    assert sum(len(g["images"]) for g in pred.grids.values()) <= 12
    stamp = (supervised_run / CACHE).stat().st_mtime_ns
    # A second report reuses the cached pass; other data recomputes it.
    assert main(["report", str(supervised_run), "--max-images", "6"]) == 0
    assert (supervised_run / CACHE).stat().st_mtime_ns == stamp
    assert "read from predictions.npz" in page.read_text()


def test_confusion_and_per_class_agree_with_eval(supervised_run, fmnist_dir, capsys):
    assert main(["report", str(supervised_run), "--max-images", "4"]) == 0
    pred = Predictions.load(supervised_run / CACHE)
    capsys.readouterr()
    assert main(["eval", str(supervised_run), "--data", str(fmnist_dir), "--device", "cpu", "--amp", "none"]) == 0
    acc1 = float(re.search(r"Acc@1 ([0-9.]+)%", capsys.readouterr().out).group(1))
    cm = metrics.confusion_matrix(pred.targets, pred.preds, 10)
    assert cm.sum() == 200 and 100 * np.trace(cm) / cm.sum() == pytest.approx(acc1, abs=0.006)
    results = json.loads((supervised_run / "results.json").read_text())
    assert 100 * np.trace(cm) / cm.sum() == pytest.approx(results["Acc@1"], abs=1e-9)

    # Per class, directly: the checkpoint's model on every validation image.
    from visionzoo.checkpoint import load_model
    from visionzoo.data.sources.idx import load_idx_split

    model, _ = load_model(supervised_run)
    images, labels = load_idx_split(str(fmnist_dir), False)
    x = (torch.from_numpy(images).float().unsqueeze(1) - 72.94) / 90.02
    with torch.no_grad():  # in the loader's batches of 32, so the logits are bit-equal on any CPU
        direct = torch.cat([model.eval()(x[i:i + 32]) for i in range(0, len(x), 32)]).argmax(1).numpy()
    expect = np.array([100 * np.mean(direct[labels == k] == k) for k in range(10)])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), expect)
    np.testing.assert_array_equal(cm, metrics.confusion_matrix(labels, direct, 10))


def test_calibration_and_confusion_formulas():
    conf = np.array([0.95, 0.9, 0.55, 0.6, 0.2, 1.0])
    correct = np.array([1, 0, 1, 1, 0, 1])
    cal = metrics.calibration(conf, correct, bins=5)
    # bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]: {0.2:0}, {}, {0.55:1, 0.6:1}, {}, {0.95:1, 0.9:0, 1.0:1}
    expect = (1 / 6) * 0.2 + (2 / 6) * abs(1 - 0.575) + (3 / 6) * abs(2 / 3 - 0.95)
    assert cal["ece"] == pytest.approx(100 * expect)
    assert list(cal["count"]) == [1, 0, 2, 0, 3]
    cm = metrics.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 0, 0, 2], 3)
    assert metrics.most_confused(cm, 2) == [(2, 0, 2, pytest.approx(200 / 3)), (0, 1, 1, 50.0)]
    np.testing.assert_allclose(metrics.row_normalise(cm).sum(1), 1.0)


def _tiny_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=28, patch_size=7,
                             embed_dim=24, depth=2, num_heads=3, dynamic_img_size=True, **kwargs).eval()


def _last_block_attention(vit, x):
    """The tokens entering the last block's attention, then softmax(q k^T / sqrt(d)), by hand."""
    seen = []
    hook = vit.blocks[-1].attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        vit(x)
    hook.remove()
    tokens, attn = seen[0], vit.blocks[-1].attn
    b, n, c = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) / (c // 3) ** 0.5).softmax(-1)


def test_dino_attention_equals_the_last_block_computed_directly():
    vit = _tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    got = cls_attention(vit, x)
    a = _last_block_attention(vit, x)
    b = x.shape[0]
    expect = a[:, :, 0, 1:].reshape(b, 3, 4, 4)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum((-2, -1)) + a[:, :, 0, 0], torch.ones(b, 3))
    maps, of = feature_attention(vit, x)  # the feature is [CLS]: its row
    assert of == CLS_ATTENTION == "[CLS] self-attention" and torch.equal(maps, got)
    # The reference's threshold: the largest patches until they hold >= 60% of the map's mass.
    mask = mass_mask(got)
    for m, keep in zip(got.flatten(0, 1), mask.flatten(0, 1), strict=True):
        flat, kept = m.flatten().numpy(), keep.flatten().numpy()
        share = np.sort(flat).cumsum() / flat.sum()  # ascending, as visualize_attention.py
        assert kept.sum() == np.sum(share > 1 - 0.6) and flat[kept].min() >= flat[~kept].max()


def test_dino_attention_of_a_vit_that_pools_its_patch_tokens():
    """global_pool=avg: [CLS]'s last row feeds nothing, so the maps are the patch tokens' rows
    averaged (patch columns only), not the [CLS] row."""
    vit = _tiny_vit(global_pool="avg")
    x = torch.randn(3, 1, 28, 28)
    maps, of = feature_attention(vit, x)
    a = _last_block_attention(vit, x)
    expect = a[:, :, 1:, 1:].mean(2).reshape(3, 3, 4, 4)
    assert of == POOLED_LABEL
    torch.testing.assert_close(maps, expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(maps, a[:, :, 0, 1:].reshape(3, 3, 4, 4), atol=1e-3)
    # each map: the mean over 16 query rows of the mass they put on the patches (the rest on [CLS])
    torch.testing.assert_close(maps.sum((-2, -1)), 1 - a[:, :, 1:, 0].mean(2), rtol=1e-5, atol=1e-6)


def test_dino_report_in_a_browser(fmnist_dir, browser, tmp_path, capsys):
    run = tmp_path / "dino"
    assert main(["train", "dino_fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *FAST,
                 *DINO_TINY]) == 0
    assert (run / "report" / "index.html").is_file()
    assert main(["report", str(run), "--max-images", "4"]) == 0
    sections = {"confusion", "mistakes", "calibration", "dino"}
    found = _check_page(browser, run / "report" / "index.html", tmp_path, sections)
    assert {"attention.png", "neighbours.png", "confusion.png"} <= {i["src"] for i in found["images"]}
    pred = Predictions.load(run / CACHE)
    assert pred.kind == "knn" and pred.attention["maps"].shape == (4, 3, 3, 3)  # 3 heads, 3x3 patches of 9 px
    assert str(pred.attention["of"]) == POOLED_LABEL
    assert f'alt="{POOLED_LABEL} maps per head"' in (run / "report" / "index.html").read_text()
    assert pred.knn["neighbours"].shape[:2] == (4, 5)
    # The k-NN top-1 of the page is the run's own k-NN figure (same k, same features).
    results = json.loads((run / "results.json").read_text())
    assert 100 * np.mean(pred.preds == pred.targets) == pytest.approx(results["Acc@1"], abs=1e-6)


def test_many_classes_get_the_most_confused_pairs(tmp_path, monkeypatch):
    """Above 30 classes the matrix has no numbers and the 20 most confused pairs come as a table."""
    from visionzoo.html_report import compute
    from visionzoo.html_report.build import write_report

    rng = np.random.default_rng(0)
    n, c = 400, 40
    targets = rng.integers(0, c, n)
    preds = np.where(rng.random(n) < 0.6, targets, (targets + 1) % c)
    pred = Predictions([f"class_{i}" for i in range(c)], "classifier", targets,
                       np.stack([preds, (preds + 2) % c], 1), np.tile(np.float32([0.7, 0.1]), (n, 1)))
    monkeypatch.setattr(compute, "cached_predictions", lambda *a, **k: (pred, "test"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: x\n")
    page = write_report(run).read_text()
    assert "The 20 most confused pairs" in page and "confusion.png" in page
    rows = re.findall(r"<tr><td>class_(\d+)</td><td>class_(\d+)</td>", page)
    assert len(rows) == 20 and all(int(p) == (int(t) + 1) % c for t, p in rows)
    assert "None." in page  # no grids: nothing to show, no failure


def test_report_of_a_missing_or_foreign_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"visionzoo: error: run folder not found: {tmp_path / 'nope'}"
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a visionzoo run folder" in capsys.readouterr().err


def _fake_run(run: Path, classes: list[str], results: dict | None = None) -> Path:
    """A run folder as training leaves it, without training: config.yaml, a model.safetensors
    whose metadata names ``classes``, and results.json."""
    from visionzoo.checkpoint import save_weights

    run.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: x\n")
    save_weights(run / "model.safetensors", torch.nn.Linear(2, len(classes)), {"classes": classes})
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    return run


def _drawn(monkeypatch) -> dict:
    """The report's figures as drawn (figures._save records each figure's texts before saving)."""
    from matplotlib.text import Text

    from visionzoo.html_report import figures

    drawn, save = {}, figures._save

    def recording(fig, path):
        drawn[Path(path).name] = [(t.get_text(), t.get_parse_math(), t.get_fontsize())
                                  for t in fig.findobj(Text) if t.get_text()]
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", recording)
    return drawn


def test_results_are_shown_once_in_words(tmp_path):
    """One key/value table, no seeds' row repeated above it; "1 epoch", "1 device", DINO's
    fractional epochs as a number of epochs, and the top-5 column named for 4 classes."""
    from visionzoo.html_report.build import write_report

    results = {"recipe": "dino_x", "Acc@1": 25.0, "Acc@5": 100.0, "eval": "k-NN k=20", "FPS": 1069.1,
               "FPS_per_device": 1069.1, "devices": 1, "epochs": 1.0, "precision": "fp32", "torch": "2.14.1",
               "mode": "full", "batch_size": 32, "crops_per_image": 2, "steps": 2, "TrainingTime": 29.93,
               "ActualLoss": 6.7426, "E2ETrainingTime": 2.04, "knn": {"20": {"top1": 25.0, "top5": 100.0}},
               "bad_images": 0, "skipped_steps": 0}
    run = _fake_run(tmp_path / "run", ["a", "b", "c", "d"], results)
    page = write_report(run, full=False).read_text()
    section = re.search(r'<section id="results">.*?</section>', page, re.S).group(0)
    rows = re.findall(r"<tr><td>(.*?)</td><td[^>]*>(.*?)</td></tr>", section)
    assert section.count("<table>") == 1
    assert rows == [
        ("Acc@1", "25.00% (k-NN k=20)"),
        ("Acc@4 (top-4 of 4 classes)", "100.00%"),
        ("20-NN top-1 / top-4", "25.00% / 100.00%"),
        ("throughput", "1,069.1 images/s (2 crops each) on 1 device"),
        ("trained", "1 epoch, 2 steps, batch 32"),
        ("last training loss", "6.7426"),
        ("time", "2.0 s end to end, 29.9 ms per optimizer step"),
    ]
    results.update({"devices": 2, "FPS_per_device": 534.55, "epochs": 1.5, "steps": 3})
    (run / "results.json").write_text(json.dumps(results))
    rows = dict(re.findall(r"<tr><td>(.*?)</td><td[^>]*>(.*?)</td></tr>", write_report(run, full=False).read_text()))
    assert rows["throughput"] == "1,069.1 images/s (2 crops each) on 2 devices, 534.5 per device"
    assert rows["trained"] == "1.5 epochs, 3 steps, batch 32"


def test_curves_mark_each_restart_of_a_resumed_run(tmp_path):
    """Each session after the first writes a resume record (MetricsLog opened on a file that has
    records); the curves draw a dashed line there on every panel, named in the loss legend."""
    from visionzoo.curves import curves_figure, curves_title, step_to_epoch
    from visionzoo.run_folder import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"

    def session(steps: range, epochs: list[int], **kw) -> None:
        log = MetricsLog(path, **kw)
        for s in steps:
            log.write(kind="step", epoch=(s - 1) // 4 + 1, step=s, loss=1.0 / s, lr=0.1)
        for e in epochs:
            log.write(kind="epoch", epoch=e, step=4 * e, train_loss=1.0 / e, acc1=10.0 * e, acc5=20.0 * e, img_s=9.0)
        log.close()

    session(range(1, 9), [1, 2])
    session(range(9, 13), [3])  # resumed from the end of epoch 2: the file's last step
    session(range(13, 17), [4], resumed_at=12)  # the engine says where
    records = read_metrics(path)
    assert [r for r in records if r["kind"] == "resume"] == [
        {"kind": "resume", "step": 8, "time": records[10]["time"]},
        {"kind": "resume", "step": 12, "time": records[16]["time"]}]
    fig = curves_figure(records, curves_title("x", "bf16", 1), topk=4)
    epochs = [r for r in records if r["kind"] == "epoch"]
    at = list(step_to_epoch([8, 12], epochs))
    assert at == [2.0, 3.0]
    loss, acc, lr, tput = fig.axes
    dashed = lambda ax: [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]  # noqa: E731
    assert dashed(loss) == dashed(lr) == at and [x - 0.5 for x in dashed(tput)] == at
    assert [t.get_text() for t in loss.get_legend().get_texts()][-2:] == ["restart 1: step 8", "restart 2: step 12"]
    assert "val Acc@4" in [t.get_text() for t in acc.get_legend().get_texts()]
    assert fig._suptitle.get_text() == "x (bf16, 1 device)"
    assert curves_title("d", "fp32", 2, "dino") == "d (DINO, k-NN accuracy; fp32, 2 devices)"


def test_confusion_numbers_grow_with_fewer_classes(tmp_path, monkeypatch):
    from visionzoo.html_report import figures

    drawn = _drawn(monkeypatch)
    cm = np.array([[0.9, 0.1, 0, 0], [0.25, 0.75, 0, 0], [0, 0, 1, 0], [0, 0.5, 0, 0.5]])
    figures.confusion_figure(cm, ["a", "b", "c", "d"], tmp_path / "four.png")
    cells = [(t, size) for t, _, size in drawn["four.png"] if t.isdigit()]
    assert sorted(t for t, _ in cells) == sorted(["90", "10", "25", "75", "100", "50", "50"])
    assert {size for _, size in cells} == {12.0}
    assert figures.cell_font_size(30, 14.0) == pytest.approx(8.96) and figures.cell_font_size(4, 5.0) == 12.0
    n = figures.ANNOTATE_UP_TO + 1
    figures.confusion_figure(np.eye(n), [f"c{i}" for i in range(n)], tmp_path / "many.png")
    texts = [t for t, _, _ in drawn["many.png"]]
    assert not [t for t in texts if t.isdigit()]  # no numbers in the 31 diagonal cells
    assert not any(t.startswith("c") and t[1:].isdigit() for t in texts)  # nor class names on the axes


def test_dollar_signs_in_class_names_are_text(tmp_path, monkeypatch):
    """Class names with "$" (matplotlib's mathtext delimiter) go through the real report: every
    figure is written and draws them as the literal text (they used to crash the page or turn
    into math)."""
    from visionzoo.html_report import compute
    from visionzoo.html_report.build import write_report

    classes = ["price $5", "$x^$", "plain", "a $b$ c"]
    rng = np.random.default_rng(0)
    n = 40
    targets = rng.integers(0, 4, n)
    preds = np.where(rng.random(n) < 0.5, targets, (targets + 1) % 4)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    grid = {"images": images, "target": np.array([0, 1, 3]), "pred": np.array([1, 3, 0]),
            "prob": np.float32([0.9, 0.8, 0.7])}
    pred = Predictions(classes, "classifier", targets, np.stack([preds, (preds + 1) % 4], 1),
                       np.tile(np.float32([0.7, 0.2]), (n, 1)), grids={"mistakes": grid})
    monkeypatch.setattr(compute, "cached_predictions", lambda *a, **k: (pred, "test"))
    drawn = _drawn(monkeypatch)
    run = _fake_run(tmp_path / "run", classes)
    page = write_report(run).read_text()
    assert {"confusion.png", "per_class.png", "mistakes.png", "reliability.png"} <= set(drawn)
    for name in ("confusion.png", "per_class.png"):
        labels = {t: math for t, math, _ in drawn[name]}
        assert {c: labels.get(c) for c in classes} == {c: False for c in classes}, name
    titles = [t for t, _, _ in drawn["mistakes.png"]]
    assert "true price $5\npred $x^$ 0.90" in titles
    assert all((run / "report" / f).stat().st_size > 1000 for f in drawn)
    assert "price $5" in page
