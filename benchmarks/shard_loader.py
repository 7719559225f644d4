"""Training-loader throughput of one set of JPEGs read five ways, and the start-up cost of a
large ImageFolder with and without the file-list cache. Not a test; results go to BENCHMARKS.md.

    python benchmarks/shard_loader.py /tmp/shardbench --images 20000 --rounds 3

Steps (each skipped when its output exists): an ImageFolder of ``--images`` 500x375 JPEGs
(benchmarks/make_jpeg_tree.py's images); ``visionzoo data pack`` of it into tar shards, tar
shards pre-resized to short side 256 and Hub-layout parquet. Then, in ``--rounds`` interleaved
rounds, the images/s of the training loader (alexnet_imagenet's augmentation: RandomResizedCrop
224 + flip + normalise, batch ``--batch``, ``--workers`` worker processes) for: ImageFolder, tar
shards from disk, the same shards over HTTP (``python -m http.server`` on 127.0.0.1), parquet,
and the --resize 256 shards. Last, the time to list a ``--files``-file ImageFolder (1000 class
folders of empty files) in a fresh process: walking the tree vs reading the cache."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
sys.path.insert(0, SRC)


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "PYTHONPATH": SRC})


def prepare(root: Path, images: int, workers: int) -> None:
    tree = root / "jpegs"
    if not tree.is_dir():
        _run(str(HERE / "make_jpeg_tree.py"), str(tree), "--train", str(images), "--val", "256", "--classes", "100")
    for name, extra in (("wds", []), ("wds256", ["--resize", "256"]), ("parquet", ["--format", "hfds"])):
        if not (root / name / "manifest.json").is_file():
            _run("-m", "visionzoo", "data", "pack", str(tree), str(root / name), "--shard-size", "128MB",
                 "--workers", str(workers), *extra)


def throughput(kind: str, path: str, batch: int, workers: int, warm: int, steps: int, cpu: bool = False) -> float:
    """Images/s of the training loader after ``warm`` batches (worker start-up left out); with
    ``cpu`` (and workers 0), images per CPU-second of this process instead: reading, decoding
    and augmenting on one core, whatever else the machine runs."""
    from visionzoo.config import load_config
    from visionzoo.data.augment.presets import train_transform
    from visionzoo.data.loading.build import build_datasets, build_loader, set_loader_epoch
    from visionzoo.data.sources.folder import ImageFolderDataset

    d = replace(load_config("alexnet_imagenet").data, workers=workers)
    if kind == "imagefolder":
        ds = ImageFolderDataset(Path(path) / "train", transform=train_transform(d))
    else:
        ds = build_datasets(replace(d, name="hfds" if kind == "parquet" else "webdataset", path=path), train=True).train
    loader = build_loader(ds, batch, workers, True)
    set_loader_epoch(loader, 0, 0)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    clock = time.process_time if cpu else time.perf_counter
    n, t0 = 0, clock()
    for _ in range(steps):
        images, _, _ = next(it)
        n += len(images)
    rate = n / (clock() - t0)
    del it, loader
    return rate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_big_tree(root: Path, files: int) -> Path:
    tree = root / f"tree{files}"
    if not tree.is_dir():
        per = files // 1000
        for c in range(1000):
            d = tree / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per):
                (d / f"n{c:08d}_{i}.JPEG").touch()
    return tree


_LIST = ("import sys, time; from visionzoo.data.sources.folder import ImageFolderDataset; t = time.perf_counter(); "
         "ds = ImageFolderDataset(sys.argv[1], scan_cache=sys.argv[2] == 'on'); "
         "print(len(ds), ds.scan_state, time.perf_counter() - t)")


def list_seconds(tree: Path, cache: str) -> tuple[int, str, float]:
    out = subprocess.run([sys.executable, "-c", _LIST, str(tree), cache], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}).stdout.split()
    return int(out[0]), out[1], float(out[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--files", type=int, default=200000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", help="comma-separated subset of the loader kinds")
    p.add_argument("--phases", default="wall,cpu,list",
                   help="wall: img/s with --workers; cpu: images per CPU-second, in-process; list: the big tree")
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VISIONZOO_CACHE", str(args.root / "cache"))
    prepare(args.root, args.images, args.workers)

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=args.root / "wds", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kinds = {"imagefolder": str(args.root / "jpegs"), "webdataset": str(args.root / "wds"),
             "webdataset-http": f"http://127.0.0.1:{port}", "parquet": str(args.root / "parquet"),
             "webdataset-resize256": str(args.root / "wds256")}
    if args.only:
        kinds = {k: v for k, v in kinds.items() if k in args.only.split(",")}
    phases = args.phases.split(",")
    rates: dict[str, dict[str, list[float]]] = {p: {k: [] for k in kinds} for p in ("wall", "cpu") if p in phases}
    try:
        time.sleep(1)
        for r in range(args.rounds):
            for phase in rates:
                for kind, path in kinds.items():
                    cpu = phase == "cpu"
                    fmt = kind.split("-")[0] if kind != "parquet" else kind
                    steps = args.steps // 3 if cpu else args.steps
                    rate = throughput(fmt, path, args.batch, 0 if cpu else args.workers, args.warm, steps, cpu)
                    rates[phase][kind].append(rate)
                    print(f"round {r + 1} {phase} {kind}: {rate:.1f} img/s" + (" per CPU-second" if cpu else ""),
                          flush=True)
    finally:
        server.kill()
        server.wait()

    tree = make_big_tree(args.root, args.files)
    starts: dict[str, list[float]] = {"walk": [], "cached": []}
    if "list" in phases:
        list_seconds(tree, "on")  # writes the cache
    for _ in range(args.rounds if "list" in phases else 0):
        n, state, s = list_seconds(tree, "off")
        starts["walk"].append(s)
        n2, state2, s2 = list_seconds(tree, "on")
        assert state2 == "cached" and n2 == n
        starts["cached"].append(s2)
        print(f"list {n} files: walk {s:.2f} s, cached {s2:.2f} s", flush=True)

    def stats(v: list[float]) -> dict:
        return {"min": min(v), "median": statistics.median(v), "max": max(v)} if v else {}

    summary = {"img_s": {p: {k: stats(v) for k, v in r.items()} for p, r in rates.items()},
               "list_s": {k: stats(v) for k, v in starts.items()},
               "images": args.images, "files": args.files, "batch": args.batch, "workers": args.workers,
               "steps": args.steps, "rounds": args.rounds}
    (args.root / f"shard_loader-{'-'.join(phases)}.json").write_text(json.dumps(summary, indent=1))
    for phase, r in summary["img_s"].items():
        for k, v in r.items():
            unit = "img per CPU-s, 0 workers" if phase == "cpu" else f"img/s, {args.workers} workers"
            print(f"{phase:4s} {k:22s} {v['min']:7.1f} - {v['max']:7.1f} {unit} (median {v['median']:.1f})")
    for k, v in summary["list_s"].items():
        if v:
            print(f"list {args.files} files, {k:6s} {v['min']:.2f} - {v['max']:.2f} s")


if __name__ == "__main__":
    main()
