"""The sharded training strategy: FSDP2 over every process, on CPUs (gloo) and GPUs (NCCL) alike.

Lightning's ``ModelParallelStrategy`` sets up the processes, a device mesh and distributed checkpoints, and
leaves the sharding to the LightningModule's ``configure_model`` hook, where every lit_llm stage applies
:func:`lit_llm.transforms.shard_stage` (FSDP2 ``fully_shard`` per transformer block). Its default mesh is
meant for tensor parallelism inside a node; :class:`FSDP2Strategy` makes every process one data-parallel
shard instead, whatever the number of devices and nodes, so the same config runs on 2 CPU processes, 8 GPUs
or several nodes unchanged.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state split over all processes.

    Each process holds ``1 / world_size`` of every weight matrix and of its AdamW moments; a transformer block
    is gathered for its forward and its backward only. ``data.batch_size`` is per process, as under DDP, and
    the data is split over the processes in the same way, so losses equal DDP's and one process's at the same
    global batch.

    Args:
        save_distributed_checkpoint: ``True``: every process writes its shard into a checkpoint *folder*
            (resumable with another number of processes: the shards are re-split on load); ``False``: the
            whole model and optimizer are gathered on rank 0 into one ordinary ``.ckpt`` file.
        process_group_backend: ``gloo`` / ``nccl``; by default the one that suits the device.
        timeout: How long a process waits for the others at a collective before it fails.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Save as the parent does, but a folder of shards is written beside the target and renamed over it
        when every rank has finished: a crash or a dead process during the save leaves the previous
        checkpoint whole (the parent writes into the existing folder, file by file)."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.is_global_zero:
            for stale in (partial, old):
                if stale.exists():
                    shutil.rmtree(stale)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every shard is on disk
        if self.is_global_zero:
            if path.is_dir():
                os.replace(path, old)
            elif path.exists():
                path.unlink()
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def setup_environment(self) -> None:
        # one data-parallel group over every process (the parent's "auto" would make one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
