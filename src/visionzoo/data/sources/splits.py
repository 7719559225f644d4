"""What every reader returns (``Splits``) and the path check most of them share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig


@dataclass
class Splits:
    """The datasets of a run; ``classes`` comes from the data, not from the recipe. A reader
    leaves the datasets' ``transform`` unset: the loading layer sets the recipe's."""

    train: Dataset | None
    val: Dataset
    classes: list[str]


def existing_dir(path: str | None, what: str) -> Path:
    """``path`` as a Path to a folder that exists, else a one-line UserError naming ``what``."""
    if not path:
        raise UserError(f"{what} needs a data folder: pass --data PATH")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path does not exist: {p}")
    if not p.is_dir():
        raise UserError(f"data path is not a folder: {p}")
    return p


def check_folder(d: DataConfig) -> None:
    """The default path check of a data source: ``data.path``, when given, is a folder."""
    if d.path:
        existing_dir(d.path, d.name)
