"""DataLoader plumbing shared by the training and evaluation streams.

A stream is a generator ``fn(worker, num_workers, ring)`` run in each DataLoader worker process
(``WorkerStream``); batches are uint8 clips written into reusable shared-memory buffers
(``BatchRing``), handed to the consuming process, which converts them (``Normalized``): to
normalised float32, or decodes JPEGs shipped undecoded (``decode="device"``).

Buffer reuse (docs/performance.md §2, items 9 and 11): a fresh shared-memory batch costs
thousands of page faults where refilling a used one costs few, and a shared-memory tensor sent
again costs a file-descriptor hand-over per batch; so each worker keeps a ring of buffers, ships
each buffer once and later batches in it by buffer id (``_buffer``, ``_shape``, ``_offset``), and
refills a buffer only once the consumer's array over it has died (a finalizer).
``make_loader(reuse=False)`` turns it off.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.transforms import augment_clips, decode_clips, frame_buffer, mean_fill, normalize_clips


class WorkerStream(IterableDataset):
    """Calls ``fn(worker, num_workers, ring)`` in each DataLoader worker (0, 1 in-process), ``ring``
    being that worker's ``BatchRing`` over ``flags`` (set by ``make_loader`` before any fork).

    ``epoch`` given (persistent loaders): the i-th ``iter()`` in a worker process runs
    ``fn(..., epoch=epoch + i)``, and the worker keeps its ring across epochs. Each DataLoader
    epoch calls ``iter()`` once per worker, so the count is the same in every worker."""

    def __init__(self, fn, length: int | None = None, epoch: int | None = None):
        self.fn, self.length, self.epoch = fn, length, epoch
        self.flags, self.ring_size = None, 0
        self.by_buffer = False  # ship a ring buffer once, later batches in it by buffer id (_ship_by_buffer)
        self.ring: BatchRing | None = None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.ring is None or self.epoch is None:
            self.ring = BatchRing(self.flags, worker * self.ring_size, self.ring_size, info is not None)
        if self.epoch is None:
            batches = self.fn(worker, workers, self.ring)
        else:
            self.epoch += 1
            batches = self.fn(worker, workers, self.ring, epoch=self.epoch - 1)
        return _ship_by_buffer(batches, self.ring) if self.by_buffer and info is not None else iter(batches)

    def __len__(self):
        if self.length is None:
            raise TypeError("this stream has no fixed length")
        return self.length


class BatchRing:
    """Batch buffers a worker reuses once the consumer has let go of them.

    A fresh batch costs thousands of page faults where refilling a used one costs none (figures in
    docs/performance.md, "Measurements behind the data path's code"). ``flags`` is a small int32 tensor shared by
    the worker and the consuming process: the worker sets a buffer's flag when it hands the buffer
    out; the consumer clears it when its own storage of that batch dies (a finalizer on the
    storage, which fires only once no tensor, view or numpy array refers to it: see
    ``Normalized.convert``). A flagged buffer is never written; with all flagged (a consumer that
    keeps its batches) the worker allocates a new one, as without a ring. In a worker process the
    buffers live in shared memory, so the DataLoader passes a handle instead of copying them."""

    def __init__(self, flags: torch.Tensor | None, base: int, size: int, shared: bool):
        self.flags = flags.numpy() if flags is not None else None  # None: no reuse
        self.base, self.size, self.shared = base, size, shared
        self.bufs: list[torch.Tensor] = []
        self.sent: set[int] = set()  # ids of the buffers the consumer has received (_ship_by_buffer)

    def get(self, shape) -> tuple[torch.Tensor, np.ndarray, int]:
        """``(tensor, numpy view, buffer_id)``; buffer_id -1: a buffer outside the ring."""
        if self.flags is not None:
            for i, t in enumerate(self.bufs):
                if self.flags[self.base + i] == 0 and t.shape == shape:
                    self.flags[self.base + i] = 1
                    return t, t.numpy(), self.base + i
        t = frame_buffer(shape, shared=self.shared)  # off-aligned: cached stores when decoding into it
        buffer_id = -1
        if self.flags is not None and len(self.bufs) < self.size:
            buffer_id = self.base + len(self.bufs)
            self.bufs.append(t)
            self.flags[buffer_id] = 1
        return t, t.numpy(), buffer_id


def _release(flags: np.ndarray, buffer_id: int) -> None:
    flags[buffer_id] = 0


def _ship_by_buffer(batches, ring: BatchRing):
    """Worker side of shipping by buffer id: a batch in a ring buffer carries ``_shape`` and ``_offset``
    (its clips are the buffer's leading rows, at that offset in its storage); once the consumer has been sent a buffer, later batches in it
    travel without the tensor. Sending a shared-memory tensor again would cost a file-descriptor
    hand-over (a socket connection with an authentication round trip) and a fresh mapping in the
    consumer for every batch; ``Normalized.convert`` keeps each buffer mapped instead."""
    for b in batches:
        buffer_id = b.get("_buffer", -1)
        if buffer_id >= 0:
            clips = b["clips"]
            buf = ring.bufs[buffer_id - ring.base]
            assert clips.data_ptr() == buf.data_ptr() and clips.is_contiguous(), "clips must lead their buffer"
            b["_shape"], b["_offset"] = tuple(clips.shape), clips.storage_offset()
            if buffer_id in ring.sent:
                del b["clips"]
            else:
                ring.sent.add(buffer_id)
            del clips, buf
        yield b


class Normalized:
    """Iterable over a DataLoader of uint8 ``(B, N, H, W, 3)`` batches that hands out float32
    ``(B, N, 3, H, W)`` normalised clips: workers ship 4x fewer bytes, and the conversion is
    one vectorised pass in the consumer (or, with ``normalize=False``, on the GPU via
    ``normalize_clips``). ``iter()`` starts the DataLoader, i.e. forks its workers, which begin
    reading shards at once (training starts the next epoch's iterator before this one ends).

    ``persistent``: the workers are forked once and serve epoch after epoch: each ``iter()``
    hands out exactly ``len()`` batches of the next epoch (and makes the workers start it, so
    call it once the previous epoch's batches are all taken); ``close()`` stops them."""

    def __init__(self, loader: DataLoader, mean, std, normalize: bool, pin: bool, decode=None,
                 persistent: bool = False):
        self.loader, self.mean, self.std, self.normalize, self.pin = loader, mean, std, normalize, pin
        self.decode = decode  # kwargs of decode_clips for batches shipped as JPEG bytes
        self.persistent = persistent
        self.length = getattr(loader.dataset, "length", None)
        flags = getattr(loader.dataset, "flags", None)  # BatchRing's flags, shared with the workers
        self.flags = flags.numpy() if flags is not None else None
        self.mapped: dict[int, np.ndarray] = {}  # by buffer id: each ring buffer shipped to us, mapped once
        self._running = None  # a persistent loader's one DataLoader iterator (torch reuses it)
        self._handed: weakref.WeakSet = weakref.WeakSet()  # its Batches, let go of by close()

    def __len__(self):
        if self.length is None:
            raise TypeError("this stream has no fixed length")
        return self.length

    def __iter__(self) -> "Batches":
        if self.loader is None:
            raise RuntimeError("this loader is closed")
        it = iter(self.loader)
        if not self.persistent:
            return Batches(self, it)
        self._running = it
        # Stop at len(): the DataLoader iterator must not be asked for more, since the
        # next iter() resets it for the next epoch while this epoch's last batch is in use.
        batches = Batches(self, it, left=len(self))
        self._handed.add(batches)
        return batches

    def close(self) -> None:
        """Stop a persistent loader's worker processes (a no-op for others: see ``Batches.close``):
        the DataLoader and its one iterator are dropped, and the iterator's finalizer stops them."""
        self._running = None
        for batches in list(self._handed):
            batches.close()
        if self.persistent:
            self.loader = None
        self.mapped.clear()  # batches handed out keep their buffers mapped (their arrays refer to them)

    def convert(self, b: dict) -> dict:
        buffer_id, shape, off = b.pop("_buffer", -1), b.pop("_shape", None), b.pop("_offset", 0)
        if shape is not None:  # shipped by buffer id (_ship_by_buffer): a fresh array over the buffer
            if "clips" in b:  # the buffer's first batch brings the buffer
                storage = b.pop("clips").untyped_storage()
                self.mapped[buffer_id] = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            arr = self.mapped[buffer_id][off:off + math.prod(shape)].reshape(shape)
            b["clips"] = torch.from_numpy(arr)  # its storage holds ``arr``: arr dies with the last view
            weakref.finalize(arr, _release, self.flags, buffer_id)
        elif buffer_id >= 0:  # the worker may refill this buffer once nothing here refers to it any more
            weakref.finalize(b["clips"].untyped_storage(), _release, self.flags, buffer_id)
        if "jpegs" in b:
            clips, replaced = decode_clips(np.require(b.pop("jpegs"), requirements="W"), b.pop("offsets"),
                                           b.pop("flips"), b.pop("erase"), pids=b["pids"], **self.decode)
            b = {"clips": clips, **b, "skipped": b["skipped"] + replaced}
            if self.normalize:
                b["clips"] = normalize_clips(clips, self.mean, self.std)  # on the device
        for key, v in b.items():  # small id arrays travel pickled, not as shared-memory tensors
            if isinstance(v, np.ndarray):
                b[key] = torch.from_numpy(v)
        if self.normalize and b["clips"].dtype == torch.uint8:
            u8 = b["clips"]
            if "flips" in b:  # float32 batches come augmented (uint8 ones leave it to model_input)
                augment_clips(u8, b.pop("flips"), b.pop("erase"), mean_fill(self.mean))
            out = torch.empty(u8.shape[:-3] + (3, *u8.shape[-3:-1]), dtype=torch.float32,
                              pin_memory=self.pin)
            b["clips"] = normalize_clips(u8, self.mean, self.std, out=out)
        return b


class Batches:
    """A running stream: ``dataloader_iter`` is the started DataLoader iterator; ``close()`` stops
    its worker processes now instead of when the last reference goes (a persistent loader's
    workers outlive its epochs: ``Normalized.close()`` stops those). ``left``: batches still to
    hand out (None: until the DataLoader ends)."""

    def __init__(self, owner: Normalized, it, left: int | None = None):
        self.owner, self.dataloader_iter, self.left = owner, it, left

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.left is not None:
            if self.left <= 0:
                raise StopIteration
            self.left -= 1
        return self.owner.convert(next(self.dataloader_iter))

    def __len__(self):
        return len(self.owner)

    def close(self) -> None:
        """No more batches. A fresh loader's workers stop as its DataLoader iterator goes (its
        finalizer, run when the last reference is dropped: this one, unless the caller kept it)."""
        self.left = 0
        self.dataloader_iter = iter(())  # a persistent loader's DataLoader keeps its own reference


def _as_is(batch):
    """No conversion in the worker: torch's default would turn every numpy array into a tensor,
    and each tensor crosses to the consumer as its own shared-memory segment plus an fd handshake."""
    return batch


def make_loader(ds: WorkerStream, num_workers: int, pin_memory: bool, prefetch_factor: int, mean, std,
                normalize: bool, decode: dict | None = None, persistent: bool = False,
                reuse: bool = True) -> Normalized:
    """The consumer's iterable over ``ds`` run in ``num_workers`` processes (0: in-process).

    Args:
        ds: the stream.
        num_workers, pin_memory, prefetch_factor, persistent: as for torch's DataLoader.
        mean, std: normalisation of the clips (``normalize``) in the consumer.
        normalize: hand out float32 ``(B, N, 3, H, W)``; False: uint8 ``(B, N, H, W, 3)``.
        decode: ``decode_clips`` keywords for batches shipped as JPEGs (``decode="device"``).
        reuse: the workers reuse batch buffers (the ring); False: a fresh buffer per batch.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    pin = bool(pin_memory) and torch.cuda.is_available()
    if num_workers > 0 and reuse:
        # batch buffers each worker may reuse: those in flight (prefetch) + the one being filled +
        # two the consumer may hold (the current batch and one it fetched ahead). None in-process:
        # there the consumer's batch *is* the ring's tensor, so its storage never dies while the
        # ring holds it (malloc recycles that memory instead).
        ds.ring_size = prefetch_factor + 3
        ds.flags = torch.zeros(num_workers * ds.ring_size, dtype=torch.int32).share_memory_()
        # the pin-memory thread copies each batch: the consumer never sees the shared buffer
        ds.by_buffer = not (pin and not normalize)
    loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                        pin_memory=pin and not normalize,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        persistent_workers=persistent and num_workers > 0)
    return Normalized(loader, mean, std, normalize, pin and normalize, decode, persistent)


