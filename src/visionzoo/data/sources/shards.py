"""Shards as a data set: tar files (sources/webdataset.py) or parquet / Arrow files
(sources/hfds.py), each read front to back by a ``ShardReader``.

The sample counts of the shards are known up front (a manifest, parquet metadata, or one
counting pass), so a ``ShardStream`` has a length and positions 0..T-1 over its shards
concatenated. Which positions a rank and a loader worker read, in which order, and how an epoch
resumes mid-way is the loader's business (loading/stream_loader.py); iterating a stream itself
reads every sample once, in order.

Faults: a sample without an image or a label, with a label out of range, or undecodable is
skipped and counted (None in place of the item; the ``n_bad`` of its batch). A shard that cannot
be opened, breaks off (truncated, corrupt, a URL that stops answering within ``data.io_timeout``)
or holds fewer samples than its count is named in one warning line and the rest of its samples
are counted as bad: the epoch goes on with the same number of batches on every rank."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from torch.utils.data import IterableDataset

from visionzoo.data.sources.encoded import bytes_item
from visionzoo.data.sources.folder import load_image
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


class SampleWarnings:
    """Names the first ``MAX_SAMPLE_WARNINGS`` bad samples of a pass in warning lines (a bad
    label, no image, undecodable bytes); the rest are only counted."""

    def __init__(self) -> None:
        self.count = 0

    def say(self, key: str, problem: str) -> None:
        if self.count >= MAX_SAMPLE_WARNINGS:
            return
        self.count += 1
        last = self.count == MAX_SAMPLE_WARNINGS
        warn(f"sample {key}: {problem}; skipped and counted"
             + (" (further bad samples of this pass are only counted)" if last else ""))


class ShardStream(IterableDataset):
    """The samples of ``shards`` (read by ``reader``) as a data set: ``len`` is the sample count;
    ``transform`` turns a decoded PIL image into the model's input, as ImageFolderDataset's does.
    Loaders come from ``StreamLoader``; iterating the stream itself reads every sample once."""

    def __init__(self, shards: list[Shard], reader: ShardReader, classes: list[str], transform: Callable | None = None,
                 shuffle_buffer: int = 0, retries: int = 0):
        self.shards, self.reader, self.classes, self.transform = list(shards), reader, list(classes), transform
        self.shuffle_buffer, self.retries = shuffle_buffer, retries
        # image: (tensor, label) items; bytes: data/loading/device_decode.py's (bytes, pixels, label)
        self.mode = "image"

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def as_bytes(self) -> ShardStream:
        """The same stream yielding undecoded samples for the device decoder."""
        other = replace_stream(self)
        other.mode = "bytes"
        return other

    def __iter__(self):
        whole, warnings = [(i, 0, s.samples, 0) for i, s in enumerate(self.shards)], SampleWarnings()
        for _, key, data, label, problem, _ in self.checked(self.slots(whole), warnings):
            item = None if problem is not None else self.decode(data, label)
            if item is None and problem is None:
                warnings.say(key, "the image cannot be decoded")
            yield item

    def label_problem(self, label: int | None) -> str | None:
        """What is wrong with ``label`` for this stream's classes, or None."""
        if label is None:
            return "no label"
        if not 0 <= label < len(self.classes):
            return f"label {label} is outside 0..{len(self.classes) - 1}"
        return None

    def decode(self, data: bytes, label: int) -> Any:
        """One good sample as the stream's item: ``(bytes tensor or None, pixels or None, label)``
        in bytes mode (the device decoder's, loading/device_decode.py), else ``(image, label)`` through
        ``transform`` (None when the image cannot be decoded)."""
        if self.mode == "bytes":
            return bytes_item(data, label)
        return decode_sample(data, label, self.transform)

    def checked(self, items: Iterator[tuple], warnings: SampleWarnings | None = None) -> Iterator[tuple]:
        """``slots`` items with label and payload problems filled in; bad samples are named by
        ``warnings`` (a failed shard's own line covers its)."""
        warnings = warnings if warnings is not None else SampleWarnings()
        for pos, key, data, label, problem, failed_shard in items:
            if problem is None:
                problem = self.label_problem(label)
            if problem is None and not isinstance(data, (bytes, bytearray, memoryview)):
                problem = f"the image is a {type(data).__name__}, not bytes"  # never a file name to open
            if problem is not None and failed_shard is None:
                warnings.say(key, problem)
            yield pos, key, data, label, problem, failed_shard

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


def decode_sample(data: bytes, label: int, transform: Callable | None) -> tuple[Any, int] | None:
    """Decode one sample's image bytes as ImageFolderDataset decodes a file; None if it cannot."""
    if not isinstance(data, (bytes, bytearray, memoryview)):  # a payload is bytes, never a file name to open
        return None
    img = load_image(data, transform)
    return None if img is None else (img, label)
