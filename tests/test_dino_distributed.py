"""DINO on 2 CPU processes (gloo) through visionzoo's own launcher (kept apart from test_dino.py:
starting the workers takes most of this file's ~25 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_dino import TINY_OVERRIDES, idx_dir  # noqa: F401  (idx_dir is a fixture)
from visionzoo.cli import main


def test_two_process_ddp_keeps_student_and_teacher_in_sync(idx_dir: Path, tmp_path: Path) -> None:
    """2 gloo workers through visionzoo's launcher: DDP student, all-reduced centre, and a teacher
    that starts from rank 0's student on every rank (each rank seeds its own initialisation).
    KoLeo is on (the student's features come back through DDP's forward). The head has
    BatchNorm: on the CPU (no SyncBatchNorm) the ranks' running statistics are averaged at the
    epoch's end, and ranks_in_sync compares them too."""
    run = tmp_path / "ddp"
    with pytest.raises(SystemExit) as done:
        main(["train", "dino_fashion_mnist", "--devices", "2", "--device", "cpu", "--data", str(idx_dir),
              "--output", str(run), *TINY_OVERRIDES, "data.batch_size=16",
              "dino.use_bn_in_head=true", "dino.koleo_weight=0.1"])  # features through DDP's forward
    assert done.value.code == 0
    res = json.loads((run / "results.json").read_text())
    assert res["devices"] == 2 and res["steps"] == 3 and res["ranks_in_sync"] is True
    assert res["Acc@1"] is not None
