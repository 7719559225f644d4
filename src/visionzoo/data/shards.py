"""Training and evaluation data streamed from shards: tar files (data/webdataset.py) or parquet /
Arrow files (data/hfds.py), each read front to back, one pass per epoch, on any number of ranks
and loader workers.

The sample counts of the shards are known up front (a manifest, parquet metadata, or one
counting pass), which is what makes the guarantees exact:

Training. The epoch's shard order is a permutation seeded by (seed, epoch); concatenated, the
shards give the epoch's sample positions 0..T-1. Each rank gets N × batch consecutive positions
(N = T // (ranks × batch), as ``ShardSampler`` drops the same remainder) and splits them into
consecutive runs, one per loader worker. A run is cut at sample boundaries, so two workers share
at most the shard at the cut: one reads up to the cut, the next streams past the part before it.
Each worker shuffles its run through a buffer of ``data.shuffle_buffer`` samples (seeded by
seed, epoch, rank and worker), so every sample is seen once per epoch over all ranks and every
rank takes the same number of steps. With fewer shards than ranks × workers this still holds,
but several workers stream through the same shard (more reading, a weaker shuffle): a warning
says so.

Batch ``j`` of a rank comes from worker ``j % workers`` (DataLoader hands out worker batches in
turn), so skipping ``k`` batches to resume mid-epoch is exact: each worker re-reads its run and
drops the samples of its batches before ``k`` before decoding anything.

Evaluation: no shuffle; rank r gets its contiguous share of the positions (``eval_indices``),
split over its workers: every sample exactly once, none padded.

Faults: a sample without an image or a label, with a label out of range, or undecodable is
skipped and counted (the ``n_bad`` of its batch). A shard that cannot be opened, breaks off
(truncated, corrupt, a URL that stops answering within ``data.io_timeout``) or holds fewer
samples than its count is named in one warning line and the rest of its samples are counted as
bad: the epoch goes on with the same number of batches on every rank. The loader keeps the names
(``bad_shards``) for results.json."""

from __future__ import annotations

import os
import random
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from visionzoo.data.samplers import SeededDataset, eval_indices, sample_seed
from visionzoo.errors import first_line

MAX_SAMPLE_WARNINGS = 10  # lines per worker and pass naming bad samples; the rest are only counted


@dataclass(frozen=True)
class Shard:
    """One shard: where it is (a path or URL, as messages name it) and how many samples it holds."""

    name: str
    samples: int


# A sample as a reader yields it: (key, image bytes or None, label or None, what is wrong or None).
Sample = tuple[str, "bytes | None", "int | None", "str | None"]


class ShardReader(Protocol):
    """Reads the samples of one shard in order, from sample ``start`` on (picklable: it travels
    to the loader workers)."""

    remote: bool  # whether a failed read is worth retrying

    def read(self, shard: Shard, start: int) -> Iterator[Sample]: ...


def shard_error(err: BaseException) -> str:
    """One line for a failed shard read ("TypeName: message"), without the stream reprs that
    webdataset appends to its messages."""
    # webdataset appends the stream and URL to an exception's args (and " @ stream" to the first).
    first = err.args[0] if len(err.args) > 1 and isinstance(err.args[0], str) else None
    text = (first.strip() if first else first_line(err)).split(" @ ")[0]
    text = text if text.startswith(type(err).__name__) else f"{type(err).__name__}: {text}"
    cause = err.__cause__ or err.__context__  # fsspec reports a timeout as FileNotFoundError from it
    if isinstance(err, FileNotFoundError) and cause is not None and cause is not err \
            and getattr(cause, "status", None) not in (403, 404):
        # fsspec turns every failed request into FileNotFoundError: the cause is what happened
        # (a refused connection, a timeout), and the file may well exist.
        return f"{type(cause).__name__}: {first_line(cause)}" if str(cause) else type(cause).__name__
    if cause is not None and cause is not err:
        text += f" ({type(cause).__name__}" + (f": {first_line(cause)})" if str(cause) else ")")
    return text


def warn(msg: str) -> None:
    print(f"visionzoo: warning: {msg}", file=sys.stderr, flush=True)


class ShardStream(IterableDataset):
    """The samples of ``shards`` (read by ``reader``) as a data set: ``len`` is the sample count;
    ``transform`` turns a decoded PIL image into the model's input, as ImageFolderDataset's does.
    Loaders come from ``StreamLoader``; iterating the stream itself reads every sample once."""

    def __init__(self, shards: list[Shard], reader: ShardReader, classes: list[str], transform: Callable | None = None,
                 shuffle_buffer: int = 0, retries: int = 0):
        self.shards, self.reader, self.classes, self.transform = list(shards), reader, list(classes), transform
        self.shuffle_buffer, self.retries = shuffle_buffer, retries
        self.mode = "image"  # image: (tensor, label) items; bytes: data/device_decode.py's (bytes, pixels, label)

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def as_bytes(self) -> "ShardStream":
        """The same stream yielding undecoded samples for the device decoder."""
        other = replace_stream(self)
        other.mode = "bytes"
        return other

    def __iter__(self):
        plan = _Pass(self, torch.zeros(2, dtype=torch.int64), 1, 1, False, 0, 0, 1)
        for item, _ in plan:
            yield item

    # ---------------------------------------------------------------------------- worker side
    def slots(self, parts: list[tuple[int, int, int, int]]) -> Iterator[tuple]:
        """``(position, key, data, label, problem, failed_shard)`` for every position of ``parts``
        (``(shard index, first, stop, first position)``), in order; a shard that fails leaves
        placeholders (data None, ``failed_shard`` its name) for its unread positions."""
        for index, lo, hi, pos0 in parts:
            shard = self.shards[index]
            got, attempts, problem = lo, 0, None
            while got < hi and problem is None:
                samples = self.reader.read(shard, got)
                try:
                    for key, data, label, why in samples:
                        yield pos0 + got - lo, key, data, label, why, None
                        got += 1
                        if got >= hi:
                            break
                    else:
                        problem = f"ends after {got} samples, expected {shard.samples}"
                except Exception as err:  # noqa: BLE001 - file, network and format libraries raise many types
                    attempts += 1
                    if not (self.reader.remote and attempts <= self.retries):
                        problem = shard_error(err)
                finally:
                    samples.close()
            if got < hi:
                warn(f"shard {shard.name}: {problem}; its {hi - got} remaining sample(s) are skipped and counted")
                for p in range(got, hi):
                    yield pos0 + p - lo, f"{shard.name}#{p}", None, None, problem, shard.name


def replace_stream(stream: ShardStream) -> ShardStream:
    """A shallow copy (its own transform and mode, the same shards and reader)."""
    other = ShardStream.__new__(ShardStream)
    other.__dict__.update(stream.__dict__)
    return other


def _parts(shards: list[Shard], order: list[int], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """The pieces of shards (index, first, stop, first position) that cover positions
    ``[start, stop)`` of the shards concatenated in ``order``."""
    out, offset = [], 0
    for i in order:
        n = shards[i].samples
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset, lo))
        offset += n
        if offset >= stop:
            break
    return out


def train_plan(n: int, batch: int, seed: int, epoch: int, rank: int, world: int, workers: int) -> list[tuple[int, int]]:
    """Per virtual worker: (first position, samples) of its run in this rank's share of one
    training epoch; worker v holds the batches j with j % workers == v."""
    del seed, epoch  # the positions do not depend on them; the shard order does
    per_rank = n // (world * batch)
    start = rank * per_rank * batch
    runs = []
    for v in range(workers):
        size = len(range(v, per_rank, workers)) * batch
        runs.append((start, size))
        start += size
    return runs


def eval_plan(n: int, batch: int, rank: int, world: int, workers: int) -> list[tuple[int, int]]:
    """Per worker: (first position, samples) of its part of this rank's evaluation share, whole
    batches each but the last non-empty one."""
    share = eval_indices(n, rank, world)
    start, size = (int(share[0]), len(share)) if len(share) else (0, 0)
    n_batches = -(-size // batch)
    sizes = [len(range(v, n_batches, workers)) * batch for v in range(workers)]
    last = max((v for v in range(workers) if sizes[v]), default=None)
    if last is not None:
        sizes[last] -= n_batches * batch - size
    runs = []
    for s in sizes:
        runs.append((start, s))
        start += s
    return runs


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: each item leaves at a random later point, within ``size`` items."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class _Pass(IterableDataset):
    """One rank's pass over a ShardStream, as DataLoader workers run it. ``state`` (shared
    memory: [epoch, batches to skip]) is read at the start of every pass, so persistent workers
    follow ``set_epoch``."""

    def __init__(self, stream: ShardStream, state: torch.Tensor, batch: int, workers: int, train: bool,
                 seed: int, rank: int, world: int):
        self.stream, self.state, self.batch, self.workers = stream, state, batch, workers
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.pending: dict[int, tuple[bytes, int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The epoch's shard order (training: shuffled per epoch; evaluation: as given)."""
        n = len(self.stream.shards)
        if not self.train:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def runs(self, epoch: int) -> list[tuple[int, int]]:
        n = len(self.stream)
        if self.train:
            return train_plan(n, self.batch, self.seed, epoch, self.rank, self.world, self.workers)
        return eval_plan(n, self.batch, self.rank, self.world, self.workers)

    def __iter__(self) -> Iterator[tuple[Any, str | None]]:
        info = get_worker_info()
        epoch, skip = (int(x) for x in self.state.tolist())
        w = info.id if info is not None else 0
        # Worker w plays virtual worker v: after skipping `skip` batches, DataLoader asks
        # worker 0 first, so it must hold batch `skip`.
        v = (w + skip) % self.workers if self.train else w
        start, size = self.runs(epoch)[v]
        parts = _parts(self.stream.shards, self.order(epoch), start, start + size)
        items: Iterator = self.stream.slots(parts)
        drop = 0
        if self.train:
            rng = random.Random(sample_seed(self.seed, epoch, self.rank * self.workers + v))
            items = _shuffled(items, max(self.stream.shuffle_buffer, 1), rng)
            drop = len(range(v, skip, self.workers)) * self.batch
        seeded = SeededDataset(self, self.seed)  # per-sample augmentation seeds, as for ImageFolder
        warned = 0
        for k, (pos, key, data, label, problem, failed_shard) in enumerate(items):
            if k < drop:
                continue
            if problem is None:
                problem = self._label_problem(label)
            if problem is not None:
                if failed_shard is None and warned < MAX_SAMPLE_WARNINGS:  # the shard's own line covers the rest
                    warned += 1
                    warn(f"sample {key}: {problem}; skipped and counted"
                         + ("" if warned < MAX_SAMPLE_WARNINGS else " (further bad samples of this pass are only counted)"))
                yield None, failed_shard
                continue
            item = self._decode(seeded, pos, epoch, data, label)
            if item is None and warned < MAX_SAMPLE_WARNINGS:  # undecodable bytes: named like a bad label
                warned += 1
                warn(f"sample {key}: the image cannot be decoded; skipped and counted"
                     + ("" if warned < MAX_SAMPLE_WARNINGS else " (further bad samples of this pass are only counted)"))
            yield item, None

    def _label_problem(self, label: int | None) -> str | None:
        if label is None:
            return "no label"
        if not 0 <= label < len(self.stream.classes):
            return f"label {label} is outside 0..{len(self.stream.classes) - 1}"
        return None

    def _decode(self, seeded: SeededDataset, pos: int, epoch: int, data: bytes, label: int) -> Any:
        if self.stream.mode == "bytes":
            from visionzoo.data.device_decode import bytes_item

            return bytes_item(data, label)
        if not self.train:
            return decode_sample(data, label, self.stream.transform)
        self.pending[pos] = (data, label)
        return seeded[(pos, epoch)]

    def __getitem__(self, pos: int) -> Any:  # what SeededDataset calls, under the sample's seeds
        data, label = self.pending.pop(pos)
        return decode_sample(data, label, self.stream.transform)


def decode_sample(data: bytes, label: int, transform: Callable | None) -> tuple[Any, int] | None:
    """Decode one sample's image bytes as ImageFolderDataset decodes a file; None if it cannot."""
    from visionzoo.data.folder import load_image

    img = load_image(data, transform)
    return None if img is None else (img, label)


class _Collate:
    """The loader's collate function on the items, plus the names of shards that failed."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, batch: list) -> tuple[Any, list[str]]:
        return self.collate([item for item, _ in batch]), list(dict.fromkeys(s for _, s in batch if s is not None))


class _EpochSetter:
    """``loader.sampler.set_epoch(epoch, skip_samples)`` for code written against ShardSampler."""

    def __init__(self, loader: "StreamLoader"):
        # A weak reference: no cycle, so a dropped loader stops its workers at once instead of in
        # a later garbage collection, which may run in a forked worker of another loader.
        self.loader = weakref.ref(loader)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        loader = self.loader()
        loader.set_epoch(epoch, skip // loader.batch_size)


class StreamLoader:
    """Batches of a ShardStream, ``batch_size`` per rank, collated by ``collate`` (training: full
    batches only, the same number on every rank). Call ``set_epoch(epoch, skip_batches)`` before
    each epoch; ``bad_shards`` lists the shards that failed so far."""

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, collate: Callable | None = None, pin_memory: bool = False):
        from visionzoo.data.folder import collate_skip_bad

        self.stream, self.batch_size, self.train = stream, batch_size, train
        self.num_workers = max(0, min(workers, os.cpu_count() or 1))
        n_virtual = max(self.num_workers, 1)
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.dataset = _Pass(stream, self.state, batch_size, n_virtual, train, seed, rank, world_size)
        self.sampler = _EpochSetter(self)
        self.bad_shards: list[str] = []
        self.loader = DataLoader(
            self.dataset, batch_size=batch_size, num_workers=self.num_workers,
            collate_fn=_Collate(collate or collate_skip_bad), pin_memory=pin_memory, drop_last=train,
            generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
            persistent_workers=self.num_workers > 0 and train, prefetch_factor=4 if self.num_workers > 0 else None,
        )
        consumers = world_size * n_virtual
        if train and rank == 0 and len(stream.shards) < consumers:
            warn(f"{len(stream.shards)} shard(s) for {world_size} rank(s) × {n_virtual} loader worker(s): workers "
                 f"share shards (each streams past the part before its own); every sample is still read once per "
                 f"epoch, but reading costs more and the shuffle is weaker: write smaller shards "
                 f"(visionzoo data pack --shard-size) or use fewer workers")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.state[0], self.state[1] = epoch, skip_batches if self.train else 0

    def __len__(self) -> int:
        epoch, skip = (int(x) for x in self.state.tolist())
        runs = self.dataset.runs(epoch)
        if self.train:
            return max(sum(size // self.batch_size for _, size in runs) - skip, 0)
        return sum(-(-size // self.batch_size) for _, size in runs)

    def __iter__(self):
        for batch, bad in self.loader:
            for name in bad:
                if name not in self.bad_shards:
                    self.bad_shards.append(name)
            yield batch
