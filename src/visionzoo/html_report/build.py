"""``visionzoo report RUN``: RUN/report/index.html, a static page of what a run did and learned.

Cheap parts (written at the end of every training run): training curves, results, the resolved
recipe, the environment, ONNX parity and speed. Full report (on demand): also per-class
accuracy, the confusion matrix, image grids of the most confident mistakes and the least
confident correct predictions, calibration (reliability diagram, ECE) and, for DINO runs, the
attention maps and k-NN neighbours. Its predictions come from one pass over the validation split,
cached as RUN/predictions.npz and reused while the weights and data are the same."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

from visionzoo.errors import UserError
from visionzoo.html_report import figures, metrics
from visionzoo.html_report.page import Section, esc, image, key_values, paragraph, preformatted, render, table

REPORT_DIR = "report"
DEFAULT_MAX_IMAGES = 24  # per grid
TOP_CONFUSED = 20
MAX_CLASS_ROWS = 100  # per-class table rows (worst first)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_run_dir(run: str | Path) -> Path:
    """A run folder (config.yaml or model.safetensors in it), or a UserError."""
    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "model.safetensors").is_file():
        raise UserError(f"{run_dir} is not a visionzoo run folder (no config.yaml or model.safetensors)")
    return run_dir


def write_report(run: str | Path, overrides: list[str] | None = None, max_images: int = DEFAULT_MAX_IMAGES,
                 full: bool = True, progress: str = "auto") -> Path:
    """Write ``RUN/report/index.html`` (and its PNGs); return its path. ``full=False``: only the
    parts that need no model pass (what training writes at its end). ``overrides`` (key=value)
    change the data, device or batch of the prediction pass."""
    run_dir = check_run_dir(run)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that this one may not draw
        old.unlink()
    results = _read_json(run_dir / "results.json") or {}
    from visionzoo.curves import topk_of

    topk = topk_of(run_dir)  # the k of "Acc@5": fewer than 5 classes make it top-N
    sections = [_curves(run_dir, out, results, topk), _results(results, topk), _recipe(run_dir),
                _environment(run_dir, results)]
    collapse = _collapse(run_dir)
    if collapse is not None:
        sections.append(collapse)
    onnx = _onnx(run_dir, topk)
    if onnx is not None:
        sections.append(onnx)
    if full:
        if max_images < 0:
            raise UserError(f"--max-images must be >= 0, got {max_images}")
        sections += _analysis(run_dir, out, list(overrides or []), max_images, progress)
    else:
        sections.append(Section("more", "Per-class accuracy, confusion, mistakes, calibration").add(paragraph(
            f"Not computed at the end of training (it needs a pass over the validation split): "
            f"run: visionzoo report {run_dir}", "note")))
    status = _read_json(run_dir / "status.json") or {}
    subtitle = f"run folder {run_dir.resolve()} | status {status.get('status', 'unknown')}" + (
        f" ({status['time']})" if status.get("time") else "")
    page = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(render(f"visionzoo report: {run_dir.name}", subtitle, [s for s in sections if s is not None]))
    tmp.replace(page)
    return page


def _curves(run_dir: Path, out: Path, results: dict, topk: int) -> Section:
    s = Section("curves", "Training curves")
    curves = run_dir / "curves.png"
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file() and metrics_file.stat().st_size and (
            not curves.is_file() or curves.stat().st_mtime < metrics_file.stat().st_mtime):
        from visionzoo.curves import curves_title, plot_curves

        title = None
        if results.get("precision") and results.get("devices"):
            task = "dino" if str(results.get("eval", "")).startswith("k-NN") else "supervised"
            title = curves_title(results.get("recipe") or run_dir.name, results["precision"], results["devices"], task)
        plot_curves(run_dir, title, topk)
    if curves.is_file():
        shutil.copyfile(curves, out / "curves.png")
        return s.add(image("curves.png", "loss, accuracy, learning rate and throughput per epoch"))
    return s.add(paragraph("No curves: the run has no metrics.jsonl records yet (or was a --perf run)."))


def count(n: float, unit: str) -> str:
    """``1 epoch``, ``2 epochs``, ``1.5 epochs``, ``1 device``: a number with its unit, plural
    unless it is exactly 1 (whole numbers without decimals)."""
    shown = f"{n:,.0f}" if float(n).is_integer() else f"{n:,.2f}".rstrip("0")
    return f"{shown} {unit}{'' if float(n) == 1 else 's'}"


def acc_name(k: int) -> str:
    """The "Acc@5" of a run with ``k`` = min(5, classes): ``Acc@5``, or ``Acc@4 (top-4 of 4
    classes)``: with 4 classes every image's class is among the top 4."""
    return "Acc@5" if k >= 5 else f"Acc@{k} (top-{k} of {k} classes)"


def _results(results: dict, topk: int) -> Section:
    """What the run achieved and how it trained, once, as sentences' parts (the seeds' table
    row is results.md)."""
    s = Section("results", "Results")
    if not results:
        return s.add(paragraph("No results.json: the run has not finished."))
    r, rows = results, {}
    pct = lambda v: f"{v:.2f}%" if isinstance(v, (int, float)) else "-"  # noqa: E731
    rows["Acc@1"] = pct(r.get("Acc@1")) + (f" ({r['eval']})" if r.get("eval") else "")
    if r.get("Acc@5") is not None:
        rows[acc_name(topk)] = pct(r["Acc@5"])
    for k, v in (r.get("knn") or {}).items():
        rows[f"{k}-NN top-1 / top-{topk}"] = f"{v['top1']:.2f}% / {v['top5']:.2f}%"
    if r.get("FPS") is not None:
        devices = r.get("devices") or 1
        per = f", {r['FPS_per_device']:,.1f} per device" if devices > 1 and r.get("FPS_per_device") else ""
        crops = f" ({r['crops_per_image']} crops each)" if r.get("crops_per_image") else ""
        rows["throughput"] = f"{r['FPS']:,.1f} images/s{crops} on {count(devices, 'device')}{per}"
    trained = [count(r["epochs"], "epoch") if r.get("epochs") is not None else None,
               count(r["steps"], "step") if r.get("steps") is not None else None,
               f"batch {r['batch_size']}" if r.get("batch_size") else None,
               f"BatchNorm over {r['BN group']}" if r.get("BN group") else None]
    rows["trained"] = ", ".join(t for t in trained if t) + (" (performance run)" if r.get("mode") == "perf" else "")
    if r.get("ActualLoss") is not None:
        rows["last training loss"] = f"{r['ActualLoss']:.4f}"
    times = [f"{r['E2ETrainingTime']:,.1f} s end to end" if r.get("E2ETrainingTime") is not None else None,
             f"{r['TrainingTime']:,.1f} ms per optimizer step" if r.get("TrainingTime") is not None else None]
    if any(times):
        rows["time"] = ", ".join(t for t in times if t)
    if r.get("bad_images"):
        rows["unreadable images skipped"] = r["bad_images"]
    if r.get("skipped_steps"):
        rows["steps skipped (non-finite loss)"] = r["skipped_steps"]
    return s.add(key_values(rows))


def _recipe(run_dir: Path) -> Section:
    s = Section("recipe", "Recipe (resolved)")
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return s.add(paragraph("No config.yaml in the run folder."))
    from visionzoo.redaction import redact_credentials

    # (a run folder written before config.yaml was redacted may still hold a tracking password)
    return s.add(preformatted(redact_credentials(cfg.read_text())))


def _environment(run_dir: Path, results: dict) -> Section:
    from visionzoo.version import __version__

    s = Section("environment", "Environment")
    status = _read_json(run_dir / "status.json") or {}
    trained = {"torch": results.get("torch"), "device": results.get("device"), "devices": results.get("devices"),
               "precision": results.get("precision"), "loader": results.get("loader"), "host": status.get("host")}
    s.add("<h3>Training</h3>" + key_values({k: v for k, v in trained.items() if v is not None}))
    import torch

    here = {"visionzoo": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    return s.add("<h3>This report</h3>" + key_values(here))


def _collapse(run_dir: Path) -> Section | None:
    """DINO's collapse indicators per epoch (the epoch records' collapse_* figures), with the
    warning's verdict; None for a run without them (supervised, or DINO before they existed)."""
    from visionzoo.engine.evaluation.collapse import Spread, collapse_warning
    from visionzoo.run_folder import read_metrics

    metrics_file = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    epochs = [(r["epoch"], s) for r in records if r.get("kind") == "epoch" and (s := Spread.from_record(r))]
    if not epochs:
        return None
    rows = []
    for epoch, s in epochs:
        rows.append([epoch, f"{s.teacher_entropy:.2f}", f"{s.teacher_image_entropy:.2f}",
                     f"{s.teacher_info:.2f} of {s.teacher_info_max:.2f}", f"{s.feature_cosine:.3f}",
                     f"{s.feature_rank:.1f}", collapse_warning(s) or "no sign of collapse"])
    header = ["epoch", "H(mean output) nats", "H(one image's output)", "information about the image",
              "mean pairwise cosine", "effective rank", "verdict"]
    note = ("The teacher on the epoch's last batch (first global crop of each image): the entropy of its mean output "
            "distribution (0: every image on one prototype), of one image's (log K: uniform outputs), their "
            "difference (what the output says about the image; 0 in either collapse), and the spread of the "
            "backbone features k-NN uses (mean cosine near 1 and effective rank near 1: one direction). "
            "docs/dino.md explains them.")
    return Section("collapse", "DINO: spread of the teacher's outputs and features").add(
        paragraph(note, "note") + table(header, rows))


def _onnx(run_dir: Path, topk: int) -> Section | None:
    """Parity and ONNX Runtime speed of the run's exports (sidecars of visionzoo export and the
    .infer.json files of visionzoo infer)."""
    rows, speed = [], []
    for side in sorted(run_dir.glob("*.json")):
        meta = _read_json(side)
        if meta and "parity" in meta and "format" in meta:
            p = meta["parity"]
            rows.append([meta.get("file", side.stem), meta["format"], meta.get("opset"), p.get("max_abs_diff"),
                         p.get("limit"), p.get("runtime")])
        elif meta and "images_per_s" in meta and side.name.endswith(".infer.json"):
            keys = ("acc1", "acc5", "samples", "images_per_s", "ms_per_image", "batch_size", "provider")
            speed.append([Path(meta.get("model", side.stem)).name, *(meta.get(k) for k in keys)])
    if not rows and not speed:
        return None
    s = Section("onnx", "Exported model")
    if rows:
        header = ["file", "format", "opset", "max |diff|", "limit", "checked with"]
        s.add("<h3>Parity with PyTorch</h3>" + table(header, rows))
    if speed:
        s.add("<h3>ONNX Runtime on the validation split</h3>" + table(
            ["model", "Acc@1", f"Acc@{topk}", "images", "images/s", "ms per image", "batch", "provider"], speed))
    return s


def _analysis(run_dir: Path, out: Path, overrides: list[str], max_images: int, progress: str) -> list[Section]:
    from visionzoo.html_report.compute import cached_predictions

    pred, note = cached_predictions(run_dir, overrides, max_images, progress)
    classes, n = pred.classes, len(pred.targets)
    cm = metrics.confusion_matrix(pred.targets, pred.preds, len(classes))
    acc = metrics.per_class_accuracy(cm)
    cal = metrics.calibration(pred.confidence, pred.preds == pred.targets)
    top5 = 100.0 * float((pred.topk == pred.targets[:, None]).any(axis=1).mean())
    how = "the classifier (softmax)" if pred.kind == "classifier" else "a weighted k-NN vote of the frozen features"
    out_sections = []
    s = Section("predictions", "Validation predictions")
    s.add(paragraph(f"{n} validation images, predicted by {how}; {note}."))
    s.add(key_values({"images": n, "Acc@1": 100.0 * float(np.trace(cm)) / max(n, 1),
                      f"Acc@{pred.topk.shape[1]}": top5, "ECE (%)": cal["ece"], "classes": len(classes)}))
    out_sections.append(s)

    s = Section("per-class", "Per-class accuracy")
    order = np.argsort(np.nan_to_num(acc, nan=np.inf), kind="stable")
    s.add(image(figures.per_class_figure(acc, classes, out / "per_class.png"), "per-class accuracy, worst first"))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows = []
    for i in order[:MAX_CLASS_ROWS]:
        j = int(off[i].argmax())
        rows.append([classes[i], int(cm[i].sum()), float(acc[i]) if not np.isnan(acc[i]) else None,
                     f"{classes[j]} ({int(off[i, j])})" if off[i, j] else "-"])
    s.add(table(["class", "images", "accuracy (%)", "most often mistaken for"], rows))
    if len(classes) > MAX_CLASS_ROWS:
        s.add(paragraph(f"The {MAX_CLASS_ROWS} worst of {len(classes)} classes."))
    out_sections.append(s)

    s = Section("confusion", "Confusion matrix")
    s.add(image(figures.confusion_figure(metrics.row_normalise(cm), classes, out / "confusion.png"),
                "row-normalised confusion matrix"))
    if len(classes) > figures.ANNOTATE_UP_TO:
        pairs = metrics.most_confused(cm, TOP_CONFUSED)
        s.add(f"<h3>The {len(pairs)} most confused pairs</h3>" + table(
            ["true class", "predicted as", "images", "% of the true class"],
            [[classes[t], classes[p], c, share] for t, p, c, share in pairs]))
    out_sections.append(s)

    s = Section("mistakes", "Mistakes and doubts")
    for name, title in (("mistakes", "Most confident mistakes"), ("unsure", "Least confident correct predictions")):
        g = pred.grids.get(name)
        if g:
            f = figures.grid_figure(g["images"], g["target"], g["pred"], g["prob"], classes, title, out / f"{name}.png")
            s.add(f"<h3>{esc(title)}</h3>" + image(f, title))
        else:
            s.add(f"<h3>{esc(title)}</h3>" + paragraph("None." if max_images else "Not drawn (--max-images 0)."))
    out_sections.append(s)

    s = Section("calibration", "Calibration")
    s.add(paragraph(f"Expected calibration error (ECE, {metrics.ECE_BINS} equal-width bins): {cal['ece']:.2f}% "
                    f"(0 = confidence matches accuracy)."))
    s.add(image(figures.reliability_figure(cal, out / "reliability.png"), "reliability diagram"))
    out_sections.append(s)

    if pred.kind == "knn":
        s = Section("dino", "DINO: attention and neighbours")
        a = pred.attention
        if a:
            of = str(a["of"]) if "of" in a else figures.CLS_ATTENTION  # caches written before "of" existed
            s.add(image(figures.attention_figure(a["images"], a["maps"], a["masks"], out / "attention.png", of),
                        f"{of} maps per head"))
        else:
            s.add(paragraph("No attention maps: the backbone is not a ViT."))
        k = pred.knn
        if k:
            grid = figures.neighbours_figure(k["queries"], k["query_labels"], k["neighbours"], k["sims"], k["labels"],
                                             classes, out / "neighbours.png")
            s.add(image(grid, "k-NN neighbours"))
        else:
            s.add(paragraph("No neighbour images: the training split cannot be read by index (a shard stream)."))
        out_sections.append(s)
    return out_sections


def report_at_end(run_dir: Path) -> None:
    """The cheap report, written when training ends; a failure here only warns (the run is done)."""
    try:
        page = write_report(run_dir, full=False)
    except Exception as err:  # noqa: BLE001 - a finished run must not fail on its page
        from visionzoo.errors import first_line

        print(f"warning: could not write the report page: {first_line(err)}", flush=True)
        return
    print(f"report: {page} (visionzoo report {run_dir} adds per-class accuracy, confusion, mistakes, calibration)",
          flush=True)
