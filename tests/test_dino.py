"""DINO: loss, teacher EMA, schedules, centring, multi-crop, k-NN, and the CLI end to end."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from visionzoo.cli import main
from visionzoo.config import load_config
from visionzoo.data.augment.multicrop import MultiCropTransform
from visionzoo.data.augment.multicrop_batched import BatchedMultiCrop, random_resized_boxes
from visionzoo.data.loading.collate import collate_multicrop
from visionzoo.engine.evaluation.knn import knn_classify
from visionzoo.engine.tasks.dino import teacher_temp_schedule
from visionzoo.models import create
from visionzoo.models.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    build_dino,
    cancel_last_layer_grads,
    dino_loss,
    koleo_loss,
    update_teacher,
)
from visionzoo.optim import clip_per_tensor, cosine_schedule

TINY_VIT = {"name": "vit_tiny_patch16_224", "library": "timm", "num_classes": 0, "in_chans": 1, "drop_rate": 0.0,
            "drop_path_rate": 0.0, "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 24, "depth": 1,
                                              "num_heads": 3, "dynamic_img_size": True}}
TINY_OVERRIDES = [
    "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
    "dino.local_crop_size=18", "data.batch_size=8", "train.epochs=1", "train.log_every=1",
    "dino.knn_k=[5,20]", "dino.linear_batch_size=16", "dino.freeze_last_layer=1",
]


# ----------------------------------------------------------------------------- loss and centring

def test_loss_equals_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, n_crops, t_temp, s_temp = 3, 7, 4, 0.04, 0.1
    student = torch.randn(n_crops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    center = torch.randn(1, k, generator=g)
    s, t, c = student.double().numpy(), teacher.double().numpy(), center.double().numpy()[0]
    total, pairs = 0.0, 0
    for i in range(2):  # teacher crop i
        for v in range(n_crops):
            if v == i:
                continue
            for n in range(b):  # image n: row i*b+n of the teacher, v*b+n of the student
                q = np.exp((t[i * b + n] - c) / t_temp)
                q /= q.sum()
                z = s[v * b + n] / s_temp
                log_p = z - np.log(np.exp(z).sum())
                total += -(q * log_p).sum() / b
            pairs += 1
    expected = total / pairs
    got = dino_loss(student, teacher, center, t_temp, s_temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert pairs == 2 * (n_crops - 1)


def test_koleo_loss_known_answer_and_it_spreads_the_batch() -> None:
    # Unit vectors at 0, 90 and 100 degrees: row 0's nearest is row 1 (chord sqrt 2), rows 1 and 2
    # are each other's nearest (chord 2 sin 5 degrees); the scale of a row does not matter.
    a = math.radians(100)
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [math.cos(a), math.sin(a)]], requires_grad=True)
    near = 2 * math.sin(math.radians(5))
    expected = -(math.log(math.sqrt(2)) + 2 * math.log(near)) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)
    # A step down its gradient pushes the close pair apart, and the loss falls.
    koleo_loss(x).backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(x - 0.01 * x.grad, dim=1)
    assert (moved[1] - moved[2]).norm() > near + 1e-3
    assert koleo_loss(moved).item() < expected
    # Identical rows: every nearest distance is ~0, a large loss (what the term fights).
    assert koleo_loss(torch.ones(4, 8)).item() > 15


def test_koleo_weight_adds_the_term_on_the_student_global_crops(idx_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """dino.koleo_weight=w: the step's loss is the DINO loss + w x (KoLeo of global crop 1 + of
    global crop 2), on the student's backbone features (with gradients), local crops left out."""
    import visionzoo.engine.tasks.dino as task

    seen: list[tuple[tuple, bool, float]] = []

    def recording(features: torch.Tensor) -> torch.Tensor:
        value = koleo_loss(features)
        seen.append((tuple(features.shape), features.requires_grad, value.item()))
        return value

    monkeypatch.setattr(task, "koleo_loss", recording)
    first = {}
    for w in (0.0, 0.5):
        run = tmp_path / f"w{w}"
        assert main(["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(run), *TINY_OVERRIDES,
                     f"dino.koleo_weight={w}", "train.amp=none"]) == 0
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        first[w] = next(r["loss"] for r in steps if r["kind"] == "step")
    assert len(seen) == 2 * 6  # 2 global crops x 6 steps, none for w = 0
    assert all(shape == (8, 24) and grad for shape, grad, _ in seen)  # batch 8, embed 24
    assert first[0.5] - first[0.0] == pytest.approx(0.5 * (seen[0][2] + seen[1][2]), abs=1e-4)


def test_centre_is_an_ema_of_the_teacher_batch_mean() -> None:
    loss = DINOLoss(out_dim=5, center_momentum=0.9)
    out = torch.arange(20, dtype=torch.float32).view(4, 5)
    for step in range(1, 4):
        loss(torch.randn(8, 5), out, teacher_temp=0.04)  # the loss itself leaves the centre alone
        loss.update_center(out)
        # c_n = 0.9 c_{n-1} + 0.1 mean  =>  c_n = (1 - 0.9^n) mean
        torch.testing.assert_close(loss.center, (1 - 0.9**step) * out.mean(0, keepdim=True))


# ----------------------------------------------------------------------------- schedules

def test_cosine_schedule_follows_the_reference_curve() -> None:
    s = cosine_schedule(0.996, 1.0, 100)
    assert len(s) == 100 and s[0] == pytest.approx(0.996)
    i = np.arange(100)
    np.testing.assert_allclose(s, 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * i / 100)))
    assert np.all(np.diff(s) > 0) and s[-1] < 1.0
    wd = cosine_schedule(0.04, 0.4, 50)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-3)
    warm = cosine_schedule(1e-3, 1e-6, 30, warmup_steps=10)
    np.testing.assert_allclose(warm[:10], np.linspace(0, 1e-3, 10))
    assert warm[10] == pytest.approx(1e-3)


def test_teacher_temperature_warm_up() -> None:
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=100, steps_per_epoch=3)
    assert len(s) == 300
    per_epoch = s[::3]
    np.testing.assert_allclose(per_epoch[:30], 0.04 + 0.03 * np.arange(30) / 29)
    np.testing.assert_allclose(per_epoch[30:], 0.07)
    np.testing.assert_allclose(s[0:3], 0.04)  # constant within an epoch
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 5, 2), 0.04)


# ----------------------------------------------------------------------------- networks

def _tiny_pair():
    cfg = load_config("dino_fashion_mnist", TINY_OVERRIDES)
    torch.manual_seed(0)
    return build_dino(create(TINY_VIT), create(TINY_VIT), 24, cfg.dino)


def test_teacher_gets_no_gradients_and_follows_the_ema_rule() -> None:
    student, teacher = _tiny_pair()
    assert all(not p.requires_grad for p in teacher.parameters())
    for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(ps, pt)  # the teacher starts as a copy of the student
    crops = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 14, 14)]
    with torch.no_grad():
        t_out = teacher(crops[:2])
    s_out = student(crops)
    assert s_out.shape == (12, 64) and t_out.shape == (8, 64)
    DINOLoss(64)(s_out, t_out, 0.04).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in teacher.parameters()]
    before_s = [p.clone() for p in student.parameters()]
    update_teacher(student, teacher, 0.9)
    for pt, t0, s0 in zip(teacher.parameters(), before_t, before_s, strict=True):
        torch.testing.assert_close(pt, 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-6)


def test_head_normalises_and_freezes_the_last_layer_gain() -> None:
    head = DINOHead(24, 50, norm_last_layer=True, hidden_dim=32, bottleneck_dim=8)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))  # unit prototypes
    assert DINOHead(24, 50, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 50) and out.abs().max() <= 1 + 1e-5  # cosine similarities


def test_freezing_the_last_layer_drops_only_its_gradients() -> None:
    student, _ = _tiny_pair()
    student([torch.randn(2, 1, 28, 28)]).sum().backward()
    cancel_last_layer_grads(student)
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert (p.grad is None) == ("last_layer" in name), name


def test_clip_per_tensor() -> None:
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.full((4,), 5.0), torch.tensor([0.6, 0.0, 0.8])  # norms 10 and 1
    clip_per_tensor([a, b], 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.6, 0.0, 0.8]))


# ----------------------------------------------------------------------------- multi-crop

def test_multicrop_shapes_per_image_and_batched() -> None:
    cfg = load_config("dino_vits16_imagenet", ["data.image_size=32", "dino.local_crop_size=16",
                                               "dino.local_crops_number=3"])
    crops = MultiCropTransform(cfg.data, cfg.dino)(Image.new("RGB", (64, 48), (200, 30, 90)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)  # handed over as uint8, normalised per batch
    batch, targets, bad = collate_multicrop([(crops, 1), None, (crops, 2)])
    assert [tuple(c.shape) for c in batch] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert targets.tolist() == [1, 2] and bad == 1

    # The recipe itself runs without local crops (a CPU-time choice); switch them on to test both paths.
    fm = load_config("dino_fashion_mnist", ["dino.local_crops_number=3", "dino.solarize_p=0.5"])
    n_local, size, g = fm.dino.local_crops_number, fm.dino.local_crop_size, fm.data.image_size
    assert (g, size) == (27, 18)  # 3x3 and 2x2 patches of 9 px, cut from the stored 28 px images
    grey = MultiCropTransform(fm.data, fm.dino)(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8))
    assert [tuple(c.shape) for c in grey] == [(1, g, g)] * 2 + [(1, size, size)] * n_local
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = BatchedMultiCrop(fm.data, fm.dino)(images, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in out] == [(5, 1, g, g)] * 2 + [(5, 1, size, size)] * n_local
    assert all(torch.isfinite(c).all() for c in out)


def test_random_resized_boxes_respect_the_scale() -> None:
    boxes = random_resized_boxes(2000, 28, 28, [0.05, 0.4], torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 28).all() and (boxes[:, 3] <= 28).all()
    frac = w * h / 28**2
    assert frac.min() >= 0.03 and frac.max() <= 0.45  # rounding of w and h widens the range a little


def test_multicrop_wrapper_groups_crops_by_resolution() -> None:
    calls = []

    class Probe(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Probe(), nn.Identity())
    out = wrapper([torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8), torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4)])
    assert calls == [(4, 1, 8, 8), (4, 1, 4, 4)] and out.shape == (8, 1)


# ----------------------------------------------------------------------------- k-NN

def test_knn_weighted_vote_known_answer() -> None:
    # One very close neighbour of class 0 against two farther ones of class 1.
    q = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    labels = torch.tensor([0, 1, 1])
    sharp = knn_classify(train, labels, q, torch.tensor([0]), [1, 3], temperature=0.07, num_classes=2)
    assert sharp[1][0] == 100.0 and sharp[3][0] == 100.0  # e^(0.9/.07) > 2 e^(0.5/.07)
    flat = knn_classify(train, labels, q, torch.tensor([0]), [3], temperature=10.0, num_classes=2)
    assert flat[3] == (0.0, 100.0)  # nearly equal weights: two votes beat one; class 0 is second


def test_knn_clusters_and_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    def sample(n):
        y = torch.arange(n) % 4
        x = torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(n, 16, generator=g), dim=1)
        return x, y
    (xt, yt), (xq, yq) = sample(200), sample(50)
    yq_wrong = (yq + 1) % 4
    full = knn_classify(xt, yt, xq, yq, [1, 10, 20], 0.07, 4)
    assert all(top1 == 100.0 for top1, _ in full.values())
    assert knn_classify(xt, yt, xq, yq_wrong, [10], 0.07, 4)[10][0] == 0.0
    chunked = knn_classify(xt, yt, xq, yq_wrong, [10, 20], 0.07, 4, max_elements=200)  # one query at a time
    assert chunked == knn_classify(xt, yt, xq, yq_wrong, [10, 20], 0.07, 4)
    assert knn_classify(xt, yt, xq, yq, [500], 0.07, 4)[500][0] == 100.0  # k capped at the bank size


# ----------------------------------------------------------------------------- end to end

def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A few dozen 28x28 images of 4 classes (a bright square in a class-specific corner)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("t10k", 24)):
        labels = np.arange(n) % 4
        images = rng.integers(0, 40, (n, 28, 28))
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 2)
            images[i, r * 14:r * 14 + 12, c * 14:c * 14 + 12] += 200
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path


@pytest.mark.parametrize("resident", [True, False])
def test_cli_train_knn_linear(idx_dir: Path, tmp_path: Path, capsys, resident: bool) -> None:
    run = tmp_path / "run"
    args = ["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(run),
            f"data.device_resident={str(resident).lower()}", *TINY_OVERRIDES]
    assert main(args) == 0
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "results.json", "results.md", "status.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["eval"] == "k-NN k=20" and 0 <= results["Acc@1"] <= 100
    assert results["steps"] == 6 and results["epochs"] == 1 and set(results["knn"]) == {"5", "20"}
    from visionzoo.checkpoint import checkpoint_pairs, load_model

    state = torch.load(checkpoint_pairs(run)[0][1], weights_only=True)
    assert {"student", "teacher", "dino_loss", "optimizer", "grad_step"} <= set(state["task"])

    backbone, meta = load_model(run)
    assert meta["task"] == "dino" and meta["model"]["num_classes"] == 0 and meta["model"]["drop_path_rate"] == 0
    assert len(meta["classes"]) == 10  # Fashion-MNIST's names; the labels were never used in training
    for key, value in state["task"]["teacher"].items():
        if key.startswith("backbone."):
            assert torch.equal(backbone.state_dict()[key[len("backbone."):]], value)

    capsys.readouterr()
    assert main(["knn", str(run), "--data", str(idx_dir), "dino.knn_k=[1,5]"]) == 0
    out = capsys.readouterr().out
    assert "1-NN: Top1" in out and "5-NN: Top1" in out
    augment = "false" if resident else "true"  # both probe paths: cached features, augmented batches
    assert main(["linear", str(run), "--data", str(idx_dir), "--epochs", "2", f"dino.linear_augment={augment}"]) == 0
    assert "linear probe" in capsys.readouterr().out


def test_cli_perf_and_random_init_baseline(idx_dir: Path, tmp_path: Path) -> None:
    perf = tmp_path / "perf"
    assert main(["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(perf), "--perf",
                 "--steps", "3", "train.perf_warmup_steps=1", *TINY_OVERRIDES]) == 0
    res = json.loads((perf / "results.json").read_text())
    assert res["mode"] == "perf" and res["FPS"] > 0 and res["Acc@1"] is None and res["steps"] == 4
    base = tmp_path / "base"
    assert main(["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(base),
                 *TINY_OVERRIDES, "train.epochs=0"]) == 0
    res = json.loads((base / "results.json").read_text())
    assert res["steps"] == 0 and res["Acc@1"] is not None and (base / "model.safetensors").is_file()


def test_cli_resume_continues_after_the_last_epoch(idx_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--data", str(idx_dir), "--output", str(run), *TINY_OVERRIDES]
    assert main(["train", "dino_fashion_mnist", *common, "train.epochs=1"]) == 0
    (run / "results.json").unlink()  # as if the run had stopped after its first epoch
    assert main(["train", "dino_fashion_mnist", *common, "train.epochs=2", "--resume", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 12 and res["epochs"] == 2
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_non_finite_loss_stops_with_a_clear_error(idx_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(DINOLoss, "forward", lambda self, s, t, temp: (s * float("nan")).sum())
    assert main(["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(tmp_path / "r"),
                 *TINY_OVERRIDES]) == 2
    assert "diverged" in capsys.readouterr().err


@pytest.mark.parametrize("allowed, code", [(0, 2), (5, 0)])
def test_non_finite_losses_stop_the_run_or_are_skipped(idx_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                       allowed: int, code: int) -> None:
    """Without train.skip_nonfinite the loss is not read every step: a NaN is found at the next
    log point, checkpoint or epoch end, and the run stops before saving anything it went through.
    With train.skip_nonfinite=N every step's loss is read and exactly the bad steps are skipped."""
    from visionzoo.checkpoint import checkpoint_pairs

    real, calls = DINOLoss.forward, {"n": 0}

    def sometimes_nan(self, s, t, temp):
        calls["n"] += 1
        loss = real(self, s, t, temp)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    monkeypatch.setattr(DINOLoss, "forward", sometimes_nan)
    run = tmp_path / "r"
    assert main(["train", "dino_fashion_mnist", "--data", str(idx_dir), "--output", str(run), *TINY_OVERRIDES,
                 "train.log_every=0", f"train.skip_nonfinite={allowed}"]) == code
    if code:
        assert "diverged" in capsys.readouterr().err and checkpoint_pairs(run) == []
    else:
        results = json.loads((run / "results.json").read_text())
        assert results["skipped_steps"] == 2 and results["steps"] == 4 and math.isfinite(results["ActualLoss"])


def test_recipes_resolve() -> None:
    vit = load_config("dino_vits16_imagenet")
    assert vit.task == "dino" and vit.data.batch_size == 512 and vit.optim.name == "adamw"
    assert vit.dino.out_dim == 65536 and vit.dino.local_crops_number == 8 and vit.model.drop_path_rate == 0.1
    assert load_config("fashion_mnist").task == "supervised"



def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("how", ["checkpoint_every_steps", "sigterm"])
def test_mid_epoch_resume_is_exact(idx_dir: Path, tmp_path: Path, monkeypatch, capsys, how: str) -> None:
    """Killed mid-epoch (only the step-2 checkpoint left) or stopped by SIGTERM at step 1, then
    resumed: the teacher ends bit-identical to an uninterrupted run, with the same step count."""
    import visionzoo.engine.run as run_engine
    from visionzoo.checkpoint import checkpoint_pairs

    common = ["--data", str(idx_dir), *TINY_OVERRIDES, "model.drop_path_rate=0.1", "train.keep_checkpoints=10"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "dino_fashion_mnist", "--output", str(ref), *common]) == 0
    if how == "checkpoint_every_steps":
        argv = ["train", "dino_fashion_mnist", "--output", str(run), *common, "train.checkpoint_every_steps=2"]
        assert main(argv) == 0
        for weights, state in checkpoint_pairs(run):  # as if killed just after step 2's checkpoint
            if weights.name != "step-000000002.safetensors":
                weights.unlink()
                state.unlink()
        (run / "results.json").unlink()
    else:
        class StopAtOnce:  # SIGTERM arrives before the first step
            requested, code, signum = True, 1, 15

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        with monkeypatch.context() as m:
            m.setattr(run_engine, "StopSignal", StopAtOnce)
            capsys.readouterr()
            assert main(["train", "dino_fashion_mnist", "--output", str(run), *common]) == 128 + 15
        assert ("stopped at step 1; checkpoint saved; continue with: visionzoo train dino_fashion_mnist --resume"
                in capsys.readouterr().err)
        assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    assert main(["train", "dino_fashion_mnist", "--resume", str(run), *common]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    a, b = _weights(ref / "model.safetensors"), _weights(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_state = torch.load(checkpoint_pairs(ref)[0][1], weights_only=True)
    run_state = torch.load(checkpoint_pairs(run)[0][1], weights_only=True)
    assert torch.equal(ref_state["task"]["dino_loss"]["center"], run_state["task"]["dino_loss"]["center"])
