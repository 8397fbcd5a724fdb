"""Images read from disk on demand: the streaming path for data that does not fit in memory.

An :class:`ImageFiles` stands where a ``uint8`` image tensor ``(N, C, H, W)`` would: it has
``shape``, ``dtype``, ``ndim`` and ``len``, and indexing it (an int, a slice, a list or a
``LongTensor`` of indices) decodes those files into a real tensor. The training loop and the
prediction functions of :mod:`specialkit.training` draw batches from it through
:func:`batches`: a ``torch.utils.data.DataLoader`` whose worker processes decode and resize one
whole batch each (one thread per worker), while the main process trains. Augmentation is not done
in the workers: it stays in the loop, batched on the device, with the run's own generator, so the
streaming path and the in-memory path see the very same pixels and give the same numbers for a seed.

Which path a dataset takes is decided when it is loaded (:func:`choose_in_memory`): in memory when
its decoded images fit ``memory_budget_gb`` (default :func:`default_memory_budget_gb`, a quarter of
the machine's RAM), else streamed; ``in_memory=True/False`` forces either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .dataset import DatasetError, resize_images
from .imagefiles import read_image

__all__ = [
    "ImageFiles",
    "batches",
    "default_memory_budget_gb",
    "choose_in_memory",
    "decoded_bytes",
    "RAM_FRACTION",
]

RAM_FRACTION = 0.25
"""Share of the machine's RAM that decoded images may take before a dataset streams from disk."""


class ImageFiles:
    """(N, channels, H, W) ``uint8`` images decoded from ``paths`` when indexed.

    Args:
        paths: (N,) image files, in label order of the split they belong to.
        channels: 1 (grey) or 3 (RGB); any file mode is converted as the in-memory loaders do.
        size: (H, W) every file is decoded and resized to (PIL bilinear, as the in-memory loaders).
        resize_to: a further square resize (``data.load(image_size=...)``: antialiased bilinear in
            torch, batch by batch, exactly as :func:`specialkit.data.resize_images`), or ``None``.
        crop: keep the aspect ratio and cut out the centre (the ImageNet loader), else stretch to ``size``.
        workers: decoding worker processes of :func:`batches` (0 = decode in the main process).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        paths: Sequence[Path | str],
        *,
        channels: int,
        size: tuple[int, int],
        resize_to: int | None = None,
        crop: bool = False,
        workers: int = 2,
    ) -> None:
        if channels not in (1, 3):
            raise DatasetError(f"ImageFiles: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if workers < 0:
            raise DatasetError(f"ImageFiles: workers must be >= 0 (0 = decode in the main process), got {workers}")
        self.paths = tuple(str(p) for p in paths)
        self.channels, self.size, self.resize_to, self.workers = (
            int(channels),
            (int(size[0]), int(size[1])),
            resize_to,
            int(workers),
        )
        self.crop = bool(crop)

    @property
    def shape(self) -> torch.Size:
        """The shape the images would have as one tensor: (N, C, H, W)."""
        h, w = (self.resize_to, self.resize_to) if self.resize_to else self.size
        return torch.Size((len(self.paths), self.channels, h, w))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, shape={tuple(self.shape)}, workers={self.workers})"

    @property
    def nbytes(self) -> int:
        """Bytes the images would take decoded in memory."""
        return int(np.prod(self.shape))

    def resized(self, size: int) -> ImageFiles:
        """The same files with a further resize to ``size`` x ``size`` (what ``data.load(image_size=...)`` does)."""
        if size < 1:
            raise DatasetError(f"image_size must be >= 1 (a side in pixels, e.g. 32), got {size}")
        return ImageFiles(
            self.paths, channels=self.channels, size=self.size, resize_to=size, crop=self.crop, workers=self.workers
        )

    def with_workers(self, workers: int) -> ImageFiles:
        """The same files decoded by ``workers`` worker processes."""
        return ImageFiles(
            self.paths,
            channels=self.channels,
            size=self.size,
            resize_to=self.resize_to,
            crop=self.crop,
            workers=workers,
        )

    def decode(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` (n,) as a (n, channels, H, W) ``uint8`` tensor (decoded here, in this process)."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        mode = "L" if self.channels == 1 else "RGB"
        out = np.empty((len(idx), self.size[0], self.size[1], self.channels), dtype=np.uint8)
        for j, i in enumerate(idx):
            out[j] = read_image(Path(self.paths[i]), mode, self.size, self.crop)
        x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        return resize_images(x, self.resize_to) if self.resize_to else x

    def __getitem__(self, key: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= int(key) < n:
                raise IndexError(f"index {key} out of range for {n} images")
            return self.decode([int(key) % n])[0]
        if isinstance(key, slice):
            return self.decode(range(*key.indices(len(self))))
        idx = torch.as_tensor(key)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        return self.decode(idx.flatten())

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``tensor.index_select(0, index)`` for files: the images at ``index`` decoded."""
        if dim != 0:
            raise IndexError("ImageFiles can only be indexed along the first (image) dimension")
        return self.decode(index)


class _BatchFiles(torch.utils.data.Dataset):
    """Item ``i`` = the decoded batch ``chunks[i]`` of ``files`` (what one worker decodes at a time)."""

    def __init__(self, files: ImageFiles, chunks: Sequence[torch.Tensor]) -> None:
        self.files, self.chunks = files, [c.cpu() for c in chunks]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            return self.files.decode(self.chunks[i])
        except DatasetError as err:  # handed to the main process as its one-line message (see batches)
            return str(err)


def _worker_init(worker_id: int) -> None:
    """Each decoding worker: one torch thread (the main process trains with the rest), its own fixed seed."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info is not None else worker_id) % 2**32
    np.random.seed(seed)


def batches(
    files: ImageFiles, chunks: Sequence[torch.Tensor], *, seed: int = 0, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """The decoded batches of ``files`` at ``chunks`` (each a (B,) index tensor), in order.

    ``files.workers`` worker processes decode ahead of the consumer (a ``DataLoader`` with automatic
    batching off: one item is one whole batch). The loader's worker seeds come from a generator
    seeded with ``seed``, never from torch's global RNG, so streaming leaves the training run's
    random numbers (dropout) exactly as the in-memory path does.

    Yields:
        (B, channels, H, W) ``uint8`` CPU tensors, one per chunk.

    Raises:
        DatasetError: a file that cannot be decoded, raised here in the main process with the one-line
            message that names the file and the fix (not the DataLoader's wrapped worker traceback).
    """
    if files.workers == 0 or len(chunks) <= 1:
        for c in chunks:
            yield files.decode(c)
        return
    loader = torch.utils.data.DataLoader(
        _BatchFiles(files, chunks),
        batch_size=None,
        shuffle=False,
        num_workers=min(files.workers, len(chunks)),
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for item in loader:
        if isinstance(item, str):
            raise DatasetError(item)
        yield item


def default_memory_budget_gb() -> float:
    """:data:`RAM_FRACTION` of the machine's physical memory in GB (4 GB where the OS does not say)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4.0
    return RAM_FRACTION * total / 1e9


def decoded_bytes(n_images: int, channels: int, size: tuple[int, int]) -> int:
    """Bytes ``n_images`` decoded (channels, H, W) ``uint8`` images take."""
    return int(n_images) * int(channels) * int(size[0]) * int(size[1])


def choose_in_memory(nbytes: int, *, in_memory: bool | None, memory_budget_gb: float | None) -> bool:
    """True = decode into memory; False = stream from disk.

    Args:
        nbytes: bytes the decoded images of every split would take.
        in_memory: ``True``/``False`` forces the path; ``None`` decides by the budget.
        memory_budget_gb: the budget; ``None`` = :func:`default_memory_budget_gb`.
    """
    if in_memory is not None:
        return bool(in_memory)
    budget = default_memory_budget_gb() if memory_budget_gb is None else float(memory_budget_gb)
    if budget <= 0:
        raise DatasetError(f"memory_budget_gb must be positive, got {memory_budget_gb}; e.g. 8 (GB), or leave it unset")
    return nbytes <= budget * 1e9
