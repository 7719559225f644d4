"""Nothing in the steady-state training step of any recipe makes the host wait for the GPU.

CI has no GPU: ``host_reads.HostReads`` emulates the training device on the CPU and records reads
of device values, blocking host→device copies and size-dependent ops (tests/host_reads.py). Each
recipe set-up trains a few steps through the CLI; the steps between log points must record
nothing. The documented exceptions are log points, checkpoints, epoch ends, the stop check on
several ranks (every 10 steps) and, only with ``train.skip_nonfinite > 0``, the per-step loss check
(tested below as what the counter sees)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from host_reads import HostReads, cases, jpeg_tree, report

CASES = list(cases(Path("."), Path("."), Path(".")))


@pytest.fixture(scope="module")
def recipes(fmnist_dir: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("host_reads")
    return cases(fmnist_dir, jpeg_tree(tmp / "jpg"), tmp)


@pytest.mark.parametrize("label", CASES)
def test_no_host_reads_between_log_points(recipes: dict, label: str) -> None:
    counter = recipes[label]()
    assert counter.events == [], report(label, counter)


def test_the_counter_sees_what_stalls_a_gpu() -> None:
    dev = torch.device("cpu")
    net = torch.nn.Linear(3, 2)
    with HostReads(dev) as h:
        net.to(dev)
        with h.counting():
            host = torch.arange(4.0)
            host.tolist(), float(host.sum()), bool(host.any())  # host values: free
            x = torch.zeros(4, device=dev)  # on the device: a fill, free
            y = x + 1
            y.sum().item(), bool(y.any()), y.tolist(), float(y[0]), int(y[1]), y.numpy()  # 6 reads
            net(y[:3]).sum().backward()
            f"{net.weight.grad.norm():.3f}", y.to("cpu")  # 2 reads
            torch.tensor(3.0, device=dev), host.to(dev), host.to(dev, non_blocking=True), y.new_tensor([1.0])  # 4
            host.pin_memory().to(dev, non_blocking=True)  # pinned and asynchronous: free
            y[y > 0], torch.nonzero(y)  # 2 size-dependent ops
            y[torch.tensor([0, 1])]  # a host index: an implicit blocking copy
    assert h.counts() == {"read": 8, "h2d": 4, "sync_op": 2, "mixed": 1}, h.events


def test_log_points_and_skip_nonfinite_are_the_only_reads(recipes: dict, fmnist_dir: Path, tmp_path: Path) -> None:
    """Through the real loop (engine/loop.py, every task): a log point reads the loss and the
    non-finite count in one read, and ``train.skip_nonfinite > 0`` checks every step's loss
    (supervised and DINO: one read per step)."""
    from host_reads import _measure

    fm = ["--data", str(fmnist_dir), "--device", "cpu", "train.epochs=1", "train.max_steps_per_epoch=8",
          "data.batch_size=32"]
    logged = _measure("fashion_mnist", fm + ["train.log_every=2"], start=2, steps=4, output=tmp_path)
    assert len(logged.events) == 2 and all("_log_point" in where for _, where in logged.events), logged.events
    skipping = _measure("fashion_mnist", fm + ["train.log_every=0", "train.skip_nonfinite=1"], output=tmp_path)
    assert skipping.counts() == {"read": 3}, skipping.events  # 3 steps counted
    dino = _measure("dino_fashion_mnist", fm + ["train.log_every=0", "train.skip_nonfinite=1", "--perf", "--steps",
                                                "6", "train.perf_warmup_steps=0"], output=tmp_path)
    assert dino.counts() == {"read": 3} and all("_skip_nonfinite" in where for _, where in dino.events), dino.events


def test_copies_to_cuda_are_pinned_and_asynchronous(monkeypatch) -> None:
    """visionzoo/transfer.py: on CUDA a batch's draws are pinned, then copied with non_blocking=True
    (a pageable or blocking copy waits for the GPU); on the CPU nothing is copied or pinned.
    torch's pin_memory and to are replaced by recorders (no GPU here)."""
    from visionzoo import transfer

    seen = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: seen.append("pin") or self.clone())
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        seen.append(("to", args, kwargs))
        return real_to(self, "cpu")

    monkeypatch.setattr(torch.Tensor, "to", to)
    parts = [torch.tensor([1.5, 2.5]), torch.tensor([[3, 4], [5, 6]]), torch.tensor([True, False])]
    lam, boxes, flag = transfer.send(parts, torch.device("cuda", 0))
    moves = [s for s in seen if s == "pin" or isinstance(s[1][0], torch.device)]  # not dtype casts
    assert moves == ["pin", ("to", (torch.device("cuda", 0),), {"non_blocking": True})]
    assert lam.tolist() == [1.5, 2.5] and boxes.tolist() == [[3, 4], [5, 6]] and flag.tolist() == [1, 0]
    seen.clear()
    transfer.to_device(torch.zeros(2), torch.device("cpu"))
    assert "pin" not in seen
