"""Exact mid-epoch resume: a seeded, rank-aware sampler and a DataLoader whose position Lightning checkpoints.

A plain ``DataLoader(shuffle=True)`` draws each epoch's order from the global RNG when it is iterated, and
Lightning (2.x) restarts such a loader from the *start* of its epoch after a mid-epoch resume: the resumed run
trains on other batches than the interrupted one would have (and Lightning warns "your dataloader is not
resumable"). :class:`ResumableDataLoader` fixes both:

* the order of epoch ``e`` is ``randperm(n, seed + e)``, split over ranks exactly as ``DistributedSampler``
  does (rank ``r`` of ``w`` takes positions ``r, r + w, ...``). Its sampler *is* a ``DistributedSampler``, so
  Lightning keeps it under DDP/FSDP, and one process with batch ``w * b`` sees the same global batches as ``w``
  processes with batch ``b``;
* it implements ``state_dict`` / ``load_state_dict`` (Lightning's ``_Stateful``): checkpoints record the epoch
  and how many samples were consumed, and a resumed run starts at the next unseen batch.

The ``lit-llm`` CLI converts every DataModule's training loader with :func:`make_resumable`; in a script
call ``make_resumable(datamodule)`` or build ``ResumableDataLoader(dataset, batch_size, shuffle=True)``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data.distributed import DistributedSampler


def _default_seed() -> int:
    return int(
        os.environ.get("PL_GLOBAL_SEED", 0)
    )  # what seed_everything set (Lightning's sampler uses it too)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded order per epoch, split over ranks) that can start part-way into an epoch.

    Args:
        dataset: A map-style dataset.
        shuffle: Shuffle with ``seed + epoch`` (else the natural order).
        seed: Shuffle seed; default ``$PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
        num_replicas: Number of ranks; default the process group's size (1 without one).
        rank: This rank; default the process group's rank (0 without one).
        drop_last: Drop the tail that does not divide over the ranks (else pad by repeating the start).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        seed = _default_seed() if seed is None else seed
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self.start = 0  # samples of this rank's share to skip in the next iteration (set on resume)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning checkpoints and resumes mid-epoch.

    Takes ``DataLoader``'s arguments, plus ``seed`` for the shuffle (``shuffle`` and ``seed`` build the
    sampler; pass ``sampler`` only to give a :class:`ResumableSampler` of your own). ``len()`` is always the
    full epoch, as Lightning expects; after ``load_state_dict`` the next iteration of the same epoch yields
    only the batches not yet seen. It never draws from the global RNG (worker seeds come from ``generator``,
    reseeded with ``seed + epoch``), so the model's random stream (dropout) is the same in a resumed run.

    With ``drop_last`` (the training loaders) an epoch over ``n`` samples on ``w`` ranks with batch ``b`` is
    the first ``n // (w * b)`` global batches of the epoch's order: each of those samples is read exactly once,
    by one rank and one worker, and the other ``n % (w * b)`` (the end of the order, so other samples each
    epoch when shuffled) are left out; none is repeated. Without it the sampler pads as ``DistributedSampler``
    does (the first ``-n % w`` samples of the order are read twice) and the last batch may be short.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int | None = None,
        sampler: ResumableSampler | None = None,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if sampler is None:
            # drop_last drops the tail of the order that does not divide over the ranks too: padding it (by
            # repeating the first samples) would train twice on those samples under DDP, and take one more
            # step than one process with the same global batch
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        elif not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        if kwargs.get("generator") is None:
            # DataLoader draws its workers' base seed from this generator (else from the global RNG, which would
            # shift the dropout masks of a resumed run by one draw); reseeded from seed + epoch every epoch
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._consumed = 0  # samples (all ranks) of the current epoch handed out before this iteration
        self._yielded = 0  # batches yielded by the current iteration
        self._pending: dict[str, Any] | None = None

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas

    def __iter__(self) -> Iterator[Any]:  # a generator: runs at the first next(), after Lightning's set_epoch
        sampler: ResumableSampler = self.sampler
        self.generator.manual_seed(sampler.seed + sampler.epoch)
        self._consumed, self._yielded = 0, 0
        state, self._pending = self._pending, None
        if state is not None and state["epoch"] == sampler.epoch and state["samples"] > 0:
            if state["samples"] % self._global_batch:
                warnings.warn(
                    f"resuming a data order saved with another batch size or number of processes: "
                    f"{state['samples']} samples were consumed, not a multiple of this run's global batch "
                    f"{self._global_batch}; the batches around the resume point differ from the first run",
                    stacklevel=2,
                )
            self._consumed = state["samples"]
            sampler.start = state["samples"] // sampler.num_replicas
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch and samples of it consumed (over all ranks); Lightning stores this in checkpoints."""
        return {
            "epoch": int(self.sampler.epoch),
            "samples": int(self._consumed + self._yielded * self._global_batch),
            "seed": int(self.sampler.seed),
            "shuffle": bool(self.sampler.shuffle),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of epoch ``state["epoch"]`` skips the samples already consumed."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            warnings.warn(
                f"resuming with data seed {self.sampler.seed}, but the checkpoint's run used {state['seed']}: "
                "the data order differs from the interrupted run",
                stacklevel=2,
            )
        self._pending = dict(state)


def resumable_dataloader(loader: Any) -> Any:
    """The same loader as a :class:`ResumableDataLoader` when it is a plain ``DataLoader`` over a map-style
    dataset with the default random or sequential sampler; anything else is returned unchanged."""
    if isinstance(loader, ResumableDataLoader) or type(loader) is not DataLoader:
        return loader
    if isinstance(loader.dataset, IterableDataset) or type(loader.batch_sampler) is not BatchSampler:
        return loader
    sampler = loader.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None or sampler.generator is not None:
            return loader
        shuffle = True
    elif type(sampler) is SequentialSampler:
        shuffle = False
    else:
        return loader
    return ResumableDataLoader(
        loader.dataset,
        loader.batch_size,
        shuffle=shuffle,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )


def make_resumable(datamodule: Any) -> Any:
    """Make ``datamodule.train_dataloader()`` return :func:`resumable_dataloader` of what it returns.

    Wraps the method on this instance only (the class is untouched); a second call does nothing.
    """
    original = datamodule.train_dataloader
    if getattr(original, "_lit_llm_resumable", False):
        return datamodule

    @functools.wraps(original)
    def train_dataloader() -> Any:
        return resumable_dataloader(original())

    train_dataloader._lit_llm_resumable = True  # type: ignore[attr-defined]
    datamodule.train_dataloader = train_dataloader
    return datamodule
