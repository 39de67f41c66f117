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


def register_strategies() -> None:
    """Give the strategy short names for ``--trainer.strategy``: ``fsdp2`` (folders of shards) and
    ``fsdp2_gathered`` (single checkpoint files gathered on rank 0). ``lit-llm`` calls it before it builds
    the trainer (not at import: importing a module changes no global registry)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for name, sharded in (("fsdp2", True), ("fsdp2_gathered", False)):
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name,
                FSDP2Strategy,
                description=f"lit_llm's FSDP2 over every process (save_distributed_checkpoint={sharded})",
                save_distributed_checkpoint=sharded,
            )


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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a folder of shards into the sharded module and its optimizers, re-split for this run's
        number of processes; return the rest (loop state, callbacks, lit_llm's metadata) for Lightning.

        Unlike the parent, a parameter the folder does not hold is allowed when it is frozen: stages leave
        frozen weights out of their checkpoints (a LoRA base, the reference of DPO / PPO / GRPO, a reward
        model) and rebuild them from the checkpoints they name. A trainable parameter missing is an error.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        from lit_llm.checkpoint import SHARDED_META, is_sharded_checkpoint

        if not is_sharded_checkpoint(path):  # one gathered file: the parent broadcasts it from rank 0
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from lit_llm.errors import CheckpointError

        stored = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        state = {"state_dict": get_model_state_dict(self.model)}
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(n for n in state["state_dict"] if f"state_dict.{n}" not in stored and n in trainable)
        if missing:
            raise CheckpointError(
                f"the checkpoint {path} lacks trained weights of this run ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}): was it written by another stage or model?"
            )
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key])
        return torch.load(path / SHARDED_META, map_location="cpu", weights_only=weights_only is not False)

    def setup_environment(self) -> None:
        # one data-parallel group over every process (the parent's "auto" would make one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
