"""Count what would make the host wait for the GPU in a training step, on a machine without one.

A GPU runs the kernels a step queues while Python goes on queueing the next ones; anything that
needs a value of a device tensor on the host (``.item()``, ``bool(t)``, ``.tolist()`` ...), a
blocking host→device copy (``torch.tensor(x, device=cuda)``, ``.to(cuda)`` of pageable memory)
or an op whose output size depends on device values (``nonzero``, boolean-mask indexing) stops
the host until the GPU has caught up. CI has no GPU, so ``HostReads`` emulates "the device" on
the CPU: it is a ``TorchFunctionMode`` that follows which tensors live on the training device —
those created with an explicit ``device=`` of the training device's type (a ``torch.device``;
the string ``"cpu"`` means the host), those copied there with ``.to(device)`` (a copy, as on a
real device), the parameters and buffers of modules moved there, and every result of an op with
such an input — and records, while ``counting``:

* ``read``: ``item``, ``tolist``, ``numpy``, ``bool``/``float``/``int``/``index``/``format`` of
  a device tensor, a device→host copy (``.cpu()``, ``host.copy_(device)``), ``torch.equal`` ...
* ``h2d``: a host→device copy that blocks: ``torch.tensor``/``as_tensor``/``new_tensor`` of host
  data onto the device, ``.to(device)`` / ``copy_`` with ``non_blocking=False`` or from memory
  that is not pinned (``pin_memory()`` is emulated: it marks the tensor pinned);
* ``sync_op``: an op whose output size depends on device values (``nonzero``, ``masked_select``,
  ``unique``, boolean-mask indexing ...);
* ``mixed``: a host tensor (not a 0-d scalar) as an operand of an op on device tensors — on a
  GPU an implicit blocking copy (indexing with host indices) or a device-mismatch error.

Limits: ``.to(torch.device("cpu"))`` of a device tensor looks like ``.to(device)`` here and is
not seen; neither is work in C++ that creates tensors without a Python-visible op (``.grad`` is
followed, and every ``nn.Parameter`` counts as on the device).

Run as a script to print the events per steady-state step of every recipe (BENCHMARKS.md)::

    PYTHONPATH=src python tests/host_reads.py
"""

from __future__ import annotations

import collections
import functools
import sys
import traceback
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
         "__array__", "cpu", "equal", "allclose", "is_nonzero", "__repr__"}
SYNC_OPS = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "histc"}
H2D_FACTORIES = {"tensor", "as_tensor", "asarray"}
FACTORIES = H2D_FACTORIES | {
    "zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "eye", "rand", "randn",
    "randint", "randperm", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
    "randn_like", "randint_like", "empty_strided", "scalar_tensor", "tril_indices", "triu_indices",
    "normal", "bernoulli", "empty_permuted"}
NO_MIXED = {"to", "copy_", "backward", "new_tensor", "__setstate__", "__deepcopy__"}  # judged above, or not ops
_HERE = Path(__file__).resolve()


def _where() -> str:
    """The innermost frame of visionzoo (else of any caller outside torch) that led here."""
    frames = traceback.extract_stack()[:-3]
    for f in reversed(frames):
        if "/visionzoo/" in f.filename:
            return f"{f.filename.split('/visionzoo/')[-1]}:{f.lineno} {f.name}"
    for f in reversed(frames):
        if "/torch/" not in f.filename and Path(f.filename).resolve() != _HERE:
            return f"{Path(f.filename).name}:{f.lineno} {f.name}"
    return "?"


class HostReads(TorchFunctionMode):
    """``with HostReads(device) as h:`` run the steps; ``with h.counting():`` around the ones to
    count (or ``h.counting_batches(loader, start, stop)``); then ``h.events`` (kind, where)."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self._device: dict[int, weakref.ref] = {}
        self._pinned: dict[int, weakref.ref] = {}
        self.active = False
        self.events: list[tuple[str, str]] = []
        self._module_to = None

    # ----------------------------------------------------------------------------- bookkeeping
    def _add(self, table: dict, t: torch.Tensor) -> None:
        key = id(t)
        if key not in table:
            table[key] = weakref.ref(t, lambda _r, k=key, tb=table: tb.pop(k, None))

    def mark(self, *objs) -> None:
        """Declare tensors, or the parameters and buffers of modules, to be on the device."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self._add(self._device, t)
            elif isinstance(obj, torch.Tensor):
                self._add(self._device, obj)

    def on_device(self, t) -> bool:
        # Parameters are the model's: on the device (also the copies EMA and DDP make in C++).
        return isinstance(t, torch.Tensor) and (id(t) in self._device or isinstance(t, torch.nn.Parameter))

    def _record(self, kind: str, what: str) -> None:
        if self.active:
            self.events.append((kind, f"{what} @ {_where()}"))

    @contextmanager
    def counting(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def counting_batches(self, loader, start: int, stop: int):
        """Make ``loader`` count from the fetch of its batch ``start`` (0-based) to the fetch of
        batch ``stop``: the work of steps start..stop-1, their batches' augmentation included."""
        counter, cls = self, type(loader)

        def __iter__(inner):
            it = cls.__iter__(inner)
            i = 0
            while True:
                counter.active = start <= i < stop
                try:
                    batch = next(it)
                except StopIteration:
                    counter.active = False
                    return
                yield batch
                i += 1

        loader.__class__ = type(cls.__name__, (cls,), {"__iter__": __iter__})
        return loader

    def counts(self) -> collections.Counter:
        return collections.Counter(kind for kind, _ in self.events)

    def __enter__(self):
        counter, real = self, torch.nn.Module.to

        def module_to(module, *args, **kwargs):
            out = real(module, *args, **kwargs)
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None and device.type == counter.device_type:
                counter.mark(out)
            return out

        self._module_to, torch.nn.Module.to = real, module_to
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Module.to = self._module_to
        return super().__exit__(*exc)

    # ----------------------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # properties: follow .grad (and .data) of device tensors
            name = "get_" + getattr(getattr(func, "__self__", None), "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        dev = [t for t in tensors if self.on_device(t)]
        host = [t for t in tensors if not self.on_device(t)]
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None

        if name == "pin_memory":
            out = args[0].clone()
            self._add(self._pinned, out)
            if self.on_device(args[0]):
                self.mark(out)
            return out
        if name == "is_pinned":
            return id(args[0]) in self._pinned

        out = func(*args, **kwargs)

        if name == "to" and this is not None:
            device, _, non_blocking, _ = torch._C._nn._parse_to(
                *args[1:4], **{k: v for k, v in kwargs.items() if k != "copy"})
            target = args[1] if len(args) > 1 else kwargs.get("device")
            if isinstance(target, str) and device is not None and device.type == "cpu":
                if self.on_device(this):  # .to("cpu"): to the host
                    self._record("read", '.to("cpu") of a device tensor')
                    return this.clone() if out is this else out
            elif device is not None and device.type == self.device_type and not self.on_device(this):
                if not non_blocking or id(this) not in self._pinned:
                    self._record("h2d", f".to(device, non_blocking={non_blocking}) from "
                                 f"{'pinned' if id(this) in self._pinned else 'pageable'} memory")
                if out is this:  # a real device makes a copy
                    out = this.clone()
                self.mark(out)
                return out
        elif name == "copy_" and this is not None:
            src = args[1] if len(args) > 1 else kwargs.get("src")
            non_blocking = (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if self.on_device(this) and not self.on_device(src):
                if not non_blocking or id(src) not in self._pinned:
                    self._record("h2d", f".copy_(host, non_blocking={non_blocking})")
            elif self.on_device(src) and not self.on_device(this):
                self._record("read", ".copy_ of a device tensor into host memory")
            return out
        elif name in FACTORIES and isinstance(kwargs.get("device"), torch.device):
            if kwargs["device"].type == self.device_type:
                if name in H2D_FACTORIES and not (args and self.on_device(args[0])):
                    self._record("h2d", f"torch.{name}(host data, device=)")
                self._mark_out(out)
                return out
        elif name == "new_tensor" and this is not None and self.on_device(this):
            self._record("h2d", "new_tensor(host data) on the device")

        if dev:
            if name in READS and this is not None and self.on_device(this):
                self._record("read", f"{name}()")
            elif name in READS:
                self._record("read", f"{name}() of device tensors")
            elif name == "__format__" and this is not None and this.dim() == 0:
                self._record("read", "format()")
            elif name in SYNC_OPS or (name == "where" and len(args) + len(kwargs) == 1):
                self._record("sync_op", name)
            elif name == "repeat_interleave" and any(isinstance(a, torch.Tensor) for a in args[1:2]) \
                    and "output_size" not in kwargs:
                self._record("sync_op", name)
            elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and self._bool_index(args):
                self._record("sync_op", f"{name} with a boolean mask")
            elif name not in NO_MIXED and [t for t in host if t.dim() > 0]:
                shapes = ", ".join(str(tuple(t.shape)) for t in host if t.dim() > 0)
                self._record("mixed", f"{name}: host tensor(s) {shapes} with device tensors")
            if name not in READS and name != "__format__":
                self._mark_out(out)
        return out

    def _bool_index(self, args) -> bool:
        index = args[1] if len(args) > 1 else None
        leaves = tree_leaves(index) if isinstance(index, (tuple, list)) else [index]
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool and self.on_device(t) for t in leaves)

    def _mark_out(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(self._device, t)


# ----------------------------------------------------------------------------- recipes, measured

def _instrument(module, name: str, counter: HostReads, start: int, stop: int, pick=lambda r: r):
    """Wrap ``module.name`` (a loader builder) so that the loader it returns counts batches start..stop-1."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        counter.counting_batches(pick(result), start, stop)
        return result

    return real, wrapped


def _measure(recipe: str, overrides: list[str], start: int = 2, steps: int = 3, patch=None,
            output: Path | None = None) -> HostReads:
    """Train ``recipe`` (CLI overrides) on the CPU under a HostReads; count the training steps
    ``start`` .. ``start + steps - 1`` (no log point or checkpoint among them). ``patch``:
    a callable taking the counter, for extra set-up (e.g. marking decoder outputs)."""
    import visionzoo.engine.tasks.classify as sup_engine
    import visionzoo.engine.tasks.dino as dino_engine
    from visionzoo.cli import main

    counter = HostReads("cpu")
    originals = []
    builders = ((sup_engine, "build_loaders", lambda r: r[0]), (dino_engine, "dino_loader", lambda r: r))
    for module, name, pick in builders:
        real, wrapped = _instrument(module, name, counter, start, start + steps, pick)
        originals.append((module, name, real))
        setattr(module, name, wrapped)
    try:
        with counter, cuda_pinning():
            undo = patch(counter) if patch else None
            import tempfile

            run_dir = tempfile.mkdtemp(prefix=f"{recipe}-", dir=output)
            code = main(["train", recipe, *overrides, "--output", run_dir])
            if undo:
                undo()
    finally:
        for module, name, real in originals:
            setattr(module, name, real)
    if code != 0:
        raise RuntimeError(f"{recipe} {overrides} exited with {code}")
    counter.steps = steps
    return counter


def report(label: str, counter: HostReads) -> str:
    n = counter.steps
    per = {k: v / n for k, v in sorted(counter.counts().items())}
    total = sum(per.values())
    lines = [f"{label}: {total:g} per step " + (str({k: round(v, 2) for k, v in per.items()}) if per else "")]
    where = collections.Counter(counter.events)
    lines += [f"    {c / n:6.2f}  {kind:8s} {what}" for (kind, what), c in where.most_common(12)]
    return "\n".join(lines)


@contextmanager
def cuda_pinning():
    """Copies to the (emulated) device go through pinned memory, as visionzoo/transfer.py does on CUDA."""
    try:
        from visionzoo import transfer
    except ImportError:  # older code without the module
        yield
        return
    real = transfer.pins
    transfer.pins = lambda device: True
    try:
        yield
    finally:
        transfer.pins = real


def fused_optimizers(counter: HostReads):
    """Build optimizers as on CUDA (fused: no host read inside GradScaler.step); returns the undo."""
    import visionzoo.engine.tasks.classify as setup_engine
    import visionzoo.engine.tasks.dino as dino_engine
    from visionzoo import optim

    real = optim.build_optimizer

    def cuda_like(model, o, device_type):
        return real(model, o, "cuda")

    modules = [m for m in (setup_engine, dino_engine, optim) if getattr(m, "build_optimizer", None) is real]
    for m in modules:
        m.build_optimizer = cuda_like
    return lambda: [setattr(m, "build_optimizer", real) for m in modules]


def device_decoder(counter: HostReads):
    """decode_jpeg's outputs are device tensors (on a GPU, nvJPEG writes them there)."""
    from visionzoo.data.loading import device_decode

    real = device_decode.decode_jpeg

    def decode(*args, **kwargs):
        out = real(*args, **kwargs)
        counter.mark(*(out if isinstance(out, list) else [out]))
        return out

    device_decode.decode_jpeg = decode
    return lambda: setattr(device_decode, "decode_jpeg", real)


def both(*patches):
    def patch(counter):
        undos = [p(counter) for p in patches]
        return lambda: [u() for u in undos]
    return patch


def measure_eval(recipe: str, overrides: list[str], start: int = 1, steps: int = 2) -> HostReads:
    """``evaluate`` of a freshly built ``recipe`` model over its validation loader, batches
    ``start`` .. ``start + steps - 1`` counted."""
    from visionzoo.config import load_config
    from visionzoo.data.loading.build import build_datasets, build_loaders
    from visionzoo.engine.evaluation.topk import evaluate
    from visionzoo.models import build_model

    cfg = load_config(recipe, overrides)
    device = torch.device("cpu")
    counter = HostReads(device)
    with counter, cuda_pinning():
        splits = build_datasets(cfg.data, train=False)
        _, val = build_loaders(splits, cfg.data, cfg.data.batch_size, device)
        net, _ = build_model(cfg.model, len(splits.classes), cfg.data.in_chans)
        net = net.to(device)
        counter.counting_batches(val, start, start + steps)
        evaluate(net, val, device, None)
    counter.steps = steps
    return counter


def cases(fmnist: Path, jpegs: Path, out: Path) -> dict:
    """label -> a function measuring that recipe set-up (the host-read test and the script share
    them): the real CLI on small data, optimizers fused and copies pinned as on CUDA."""
    fm = ["--data", str(fmnist), "--device", "cpu", "train.log_every=0", "train.epochs=1",
          "train.max_steps_per_epoch=6", "data.batch_size=32"]
    mix = ["train.mixup=0.8", "train.cutmix=1.0", "train.ema_decay=0.9", "optim.clip_mode=agc", "optim.clip_value=0.01"]
    folder = ["--data", str(jpegs), "--device", "cpu", "--workers", "0", "data.decode=device",
              "train.log_every=0", "train.epochs=1"]
    cpu_folder = [a for a in folder if a != "data.decode=device"]
    tiny_dino = [
        "model.kwargs={img_size: 27, patch_size: 9, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[2]", "dino.knn_report_k=2"]
    rgb_dino = ["data.image_size=32", "dino.local_crop_size=16", "dino.local_crops_number=2", "data.batch_size=4",
                "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 24, depth: 1, num_heads: 3, "
                "dynamic_img_size: true}",
                "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.knn_k=[2]",
                "dino.knn_report_k=2", "data.test_resize=36", "data.test_size=32", "dino.solarize_p=0.2"]
    measure = functools.partial(_measure, output=out, patch=fused_optimizers)
    return {
        "fashion_mnist": lambda: measure("fashion_mnist", fm),
        "fashion_mnist + mixup/cutmix elem, EMA, AGC": lambda: measure(
            "fashion_mnist", fm + mix + ["train.mixup_mode=elem"]),
        "fashion_mnist + mixup/cutmix batch (timm), EMA, AGC": lambda: measure(
            "fashion_mnist", fm + mix + ["train.mixup_mode=batch"]),
        "fashion_mnist + RandAugment on the device": lambda: measure(
            "fashion_mnist", fm + ["data.randaugment=rand-m9-n3-mstd0.5"]),
        "fashion_mnist fp16 + loss scaler": lambda: measure("fashion_mnist", fm + ["train.amp=fp16"]),
        "fashion_mnist evaluation": lambda: measure_eval(
            "fashion_mnist", [f"data.path={fmnist}", "data.batch_size=16"]),
        "nfnet_f0_imagenet data: decode=device, RandAugment, mixup (small CNN)": lambda: measure(
            "nfnet_f0_imagenet", folder + [
                "model.name=small_cnn", "model.library=visionzoo", "model.kwargs={width: 4}", "model.drop_rate=0",
                "model.drop_path_rate=0", "model.channels_last=false", "data.batch_size=4", "data.image_size=16",
                "data.test_resize=18", "data.test_size=16", "train.amp=none", "train.max_steps_per_epoch=6"],
            start=1, steps=2, patch=both(device_decoder, fused_optimizers)),
        "alexnet_imagenet data: decode=cpu, Pillow workers hand over uint8 (small CNN)": lambda: measure(
            "alexnet_imagenet", cpu_folder + [
                "model.name=small_cnn", "model.library=visionzoo", "model.kwargs={width: 4}", "model.drop_rate=0",
                "data.batch_size=4", "data.image_size=16", "data.test_resize=18", "data.test_size=16",
                "train.amp=none", "train.max_steps_per_epoch=6"], start=1, steps=2, patch=fused_optimizers),
        "dino_vits16_imagenet data: decode=cpu multi-crop, uint8 crops (tiny ViT)": lambda: measure(
            "dino_vits16_imagenet", cpu_folder + rgb_dino + ["train.max_steps_per_epoch=4"], start=1, steps=2,
            patch=fused_optimizers),
        "dino_fashion_mnist (as shipped: 4-block ViT, 2 crops)": lambda: measure(
            "dino_fashion_mnist", fm + ["--perf", "--steps", "6", "train.perf_warmup_steps=0"]),
        "dino_fashion_mnist, tiny ViT, 2 local crops, KoLeo": lambda: measure(
            "dino_fashion_mnist", fm + tiny_dino + ["dino.local_crops_number=2", "dino.local_crop_size=18",
                                                    "dino.koleo_weight=0.1"]),
        "dino_vits16_imagenet data: decode=device, RGB jitter (tiny ViT)": lambda: measure(
            "dino_vits16_imagenet", folder + rgb_dino + ["train.max_steps_per_epoch=4"], start=1, steps=2,
            patch=both(device_decoder, fused_optimizers)),
    }


def jpeg_tree(root: Path, n: int = 12) -> Path:
    """train/ and val/ ImageFolders of JPEGs of many sizes (and one PNG)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                img = Image.fromarray(rng.integers(0, 256, (30 + 4 * i, 40 + 2 * i, 3), dtype=np.uint8))
                img.save(folder / f"{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / "train/a/extra.png")
    return root


if __name__ == "__main__":  # pragma: no cover - the BENCHMARKS.md measurement
    import contextlib
    import io
    import tempfile

    sys.path.insert(0, str(_HERE.parent))
    from conftest import write_fmnist

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "fm").mkdir()
    (tmp / "runs").mkdir()
    runs = cases(write_fmnist(tmp / "fm", 640, 64), jpeg_tree(tmp / "jpg"), tmp / "runs")
    for label, run in runs.items():
        if len(sys.argv) > 1 and not any(a in label for a in sys.argv[1:]):
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            counter = run()
        print(report(label, counter), flush=True)
