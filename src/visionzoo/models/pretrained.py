"""``model.pretrained=true``: timm's and torchvision's own pretrained weights, from their download
caches (the Hugging Face hub cache for timm, torch.hub's for torchvision and timm's older URLs),
downloaded by those libraries when the network is up.

Without a cached file, visionzoo first checks that the download host answers (a TCP connect
with a PROBE_TIMEOUT_S limit) and stops with one line naming the cache it searched when it does
not, or when HF_HUB_OFFLINE=1: no hang, no retry loop (huggingface_hub would retry every file
for about a minute). torchvision downloads run with a socket timeout of DOWNLOAD_TIMEOUT_S."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import torch
import torch.nn as nn

from visionzoo.errors import UserError, first_line

PROBE_TIMEOUT_S = 5.0
DOWNLOAD_TIMEOUT_S = 60.0
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from a hub repo, in order


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (huggingface_hub's switch) keeps visionzoo off the network too."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(url: str) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within PROBE_TIMEOUT_S."""
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _unavailable(what: str, where: str, url: str) -> UserError:
    why = "HF_HUB_OFFLINE=1" if offline() else f"{urlparse(url).hostname} cannot be reached"
    return UserError(f"model.pretrained: {what} is not in {where} and {why}; download it where there is a "
                     f"network (or pass the file as model.weights=PATH)")


def torch_hub_file(url: str) -> str:
    """Where torch.hub keeps the download of ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def timm_overlay(name: str) -> dict:
    """``pretrained_cfg_overlay`` for ``timm.create_model(name, pretrained=True)``: the cached
    state dict when there is one (timm then adapts classifier and input channels as usual), {}
    when timm may download, a UserError naming the cache when it cannot."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    from visionzoo.models.weights import from_state_dict, read_file

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"model.pretrained: timm has no pretrained weights for '{name}'")
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ((cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HF_FILES):
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return {"state_dict": from_state_dict(read_file(hit)[0], hit)}
        what, where, url = f"timm's {repo}", f"the Hugging Face cache {constants.HF_HUB_CACHE}", f"https://huggingface.co/{repo}"
    else:
        path = torch_hub_file(cfg.url)
        if os.path.isfile(path):
            return {"state_dict": from_state_dict(read_file(path)[0], path)}
        what, where, url = f"timm's {name} weights", path, cfg.url
    if offline() or not reachable(url):
        raise _unavailable(what, where, url)
    return {}


def torchvision_state_dict(name: str) -> dict:
    """The DEFAULT pretrained weights of torchvision model ``name`` through torchvision's own
    loading (torch.hub's cache, downloaded there when missing and the network is up)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"model.pretrained: torchvision has no pretrained weights for '{name}'") from None
    path = torch_hub_file(weights.url)
    if not os.path.isfile(path) and (offline() or not reachable(weights.url)):
        raise _unavailable(f"torchvision's {name} weights ({os.path.basename(path)})", path, weights.url)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"model.pretrained: torchvision's {name} weights could not be loaded: "
                        f"{first_line(err)}") from None


def load_torchvision_pretrained(model: nn.Module, args: dict) -> None:
    """torchvision's pretrained weights into ``model`` (built without), the classifier
    re-initialised when the class count differs."""
    from visionzoo.models.weights import from_torchvision, load_into, say

    load_into(model, from_torchvision(torchvision_state_dict(args["name"])), args,
              f"torchvision's pretrained {args['name']}")
    say(f"torchvision's pretrained weights loaded into {args['name']}")
