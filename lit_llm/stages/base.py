"""What every stage shares: building the backbone (from a preset or a previous stage's checkpoint),
storing config and tokenizer in checkpoints, the optimizer (AdamW, or Muon beside AdamW), warmup + cosine."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.checkpoint import META_KEY, load_backbone
from lit_llm.data.common import import_function
from lit_llm.errors import CheckpointError, UserError
from lit_llm.evaluation import RewardModel, chat_completions, gold_score
from lit_llm.lora import AdaptersOff, LoRAConfig, apply_lora, base_fingerprint, lora_layers
from lit_llm.optim import build_optimizer
from lit_llm.rl.scoring import RewardSources, rollout_table
from lit_llm.tokenizer import Tokenizer
from lit_llm.transforms import gathered

RNG_KEY = "lit_llm_rng"


class Stage(LightningModule):
    """Base of the four stages. Subclasses implement ``_step(batch, stage) -> loss`` and may add heads.

    Args:
        preset: Named model preset (see ``ModelConfig.from_name``); ignored with ``init_from``.
        model_overrides: Field overrides for the preset, e.g. ``{n_layer: 2, mlp: gelu}``.
        vocab_size: Linked from the data's tokenizer by the CLI; never typed by hand.
        block_size: Linked from the data's sequence length by the CLI (at least that long).
        init_from: Start from this lit_llm checkpoint (weights, config and tokenizer come with it).
        learning_rate: Peak AdamW learning rate (with ``optimizer: muon``, that of the embeddings, heads,
            norms and biases).
        weight_decay: Decoupled weight decay on matrices (not on norms, biases).
        betas: AdamW betas.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final learning rate of the cosine schedule, as a fraction of the peak.
        compile: Compile each block's training forward with ``torch.compile`` (see ``lit_llm.transforms``).
        activation_checkpointing: Recompute each block's activations in the backward pass instead of storing
            them: less memory for about one more forward pass of compute; same loss and gradients.
        optimizer: ``adamw`` on every parameter, or ``muon``: Muon (orthogonalised momentum) on the hidden
            weight matrices (attention, MLP, each MoE expert), AdamW on embeddings, heads, norms and
            biases; the warmup + cosine schedule scales both. See ``lit_llm.optim``.
        muon_lr: Peak Muon learning rate; ``null`` uses ``learning_rate``.
        muon_momentum: Muon's Nesterov momentum.
        muon_adjust_lr: Muon's learning-rate scale per matrix shape: ``match_rms_adamw`` (``0.2 *
            sqrt(max(out, in))``, an update as large as AdamW's, so AdamW's rates carry over) or
            ``original`` (``sqrt(max(1, out / in))``, Keller Jordan's; wants ``muon_lr`` near 0.02).
        lora: Fine-tune LoRA adapters instead of all weights (``--model.lora.rank 8``, ``alpha``, ``dropout``,
            ``targets``, ``train_modules``; see ``lit_llm.lora.LoRAConfig``): the backbone is frozen, heads the stage adds (reward
            and value heads, PPO's critic) still train, a frozen reference (PPO, GRPO, DPO) is the policy
            with its adapters off instead of a copy, and checkpoints hold only what trains, naming the base
            (``init_from``) by path and weight hash. Needs ``init_from``.
    """

    stage_name = "base"

    def __init__(
        self,
        preset: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        block_size: int | None = None,
        init_from: str | None = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        activation_checkpointing: bool = False,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float | None = None,
        muon_momentum: float = 0.95,
        muon_adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw",
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lora_config = LoRAConfig.from_any(lora)
        # checkpoints hold plain containers only (they are read with weights_only=True)
        self.hparams["lora"] = self.lora_config.to_dict() if self.lora_config else None
        if self.lora_config is not None and init_from is None:
            raise UserError("LoRA adapts a trained model: set --model.init_from path/to/checkpoint")
        self._lora_base: dict[str, Any] | None = None
        # frozen children named in checkpoints instead of stored: {name: {"path", "sha256", "what"}}
        self._frozen_parts: dict[str, dict[str, str]] = {}
        self.tokenizer: Tokenizer | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        if init_from is not None:
            self.model, self.tokenizer, _ = load_backbone(init_from)
            cfg = self.model.config
            # a real model's embedding may have more rows than its tokenizer has tokens, never fewer
            if vocab_size is not None and vocab_size > cfg.vocab_size:
                raise CheckpointError(
                    f"the data's tokenizer has {vocab_size} tokens but {init_from} has only {cfg.vocab_size} "
                    f"embedding rows: use the checkpoint's tokenizer (data.tokenizer={init_from})"
                )
            if block_size is not None and block_size > cfg.block_size and cfg.pos == "learned":
                raise CheckpointError(
                    f"seq_len {block_size} exceeds the checkpoint's block_size {cfg.block_size}"
                )
        else:
            overrides = dict(model_overrides or {})
            if vocab_size is not None:
                overrides["vocab_size"] = vocab_size
            if block_size is not None:
                overrides["block_size"] = max(block_size, overrides.get("block_size", 0))
            self.model = Transformer(ModelConfig.from_name(preset, **overrides))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def frozen_reference(self) -> torch.nn.Module | AdaptersOff:
        """A frozen reference model equal to the starting policy: with LoRA, the policy itself with its
        adapters off (no second copy of the weights); otherwise a frozen deep copy of the policy."""
        if self.lora_config is not None:
            return AdaptersOff(self.model)
        return copy.deepcopy(self.model).requires_grad_(False).eval()

    def set_frozen(self, name: str, module: Any, path: str | None, what: str) -> Any:
        """Make ``module`` the frozen child ``name`` (``self.ref``, ``self.rm``), rebuilt from the checkpoint
        ``path`` by every run: checkpoints do not store its weights but name it by path and weight hash
        (``base_fingerprint``), and a resume checks the hash and puts the weights back (``_restore_frozen_base``).
        ``what`` names it in errors. ``path`` ``None`` or a module that is not an ``nn.Module`` (the policy
        with its adapters off): nothing to name, it holds no weights of its own."""
        setattr(self, name, module)
        self._frozen_parts.pop(name, None)
        if isinstance(module, torch.nn.Module) and path is not None:
            module.requires_grad_(False)
            self._frozen_parts[name] = {
                "path": str(Path(path).resolve()),  # absolute: later commands run from anywhere
                # hashed as loaded (before a precision plugin converts it): the next run's rebuild hashes the same
                "sha256": base_fingerprint(module),
                "what": what,
            }
        return module

    def frozen_fingerprints(self) -> dict[str, dict[str, str]]:
        """``{name: {"path", "sha256"}}`` of the frozen children: what a checkpoint stores instead of them."""
        return {name: {"path": p["path"], "sha256": p["sha256"]} for name, p in self._frozen_parts.items()}

    def configure_model(self) -> None:
        """Apply the transforms chosen by ``lora``, ``activation_checkpointing`` and ``compile`` (in this
        order: the checkpointed and compiled blocks contain the adapters), then, under the sharded strategy
        (:class:`lit_llm.strategies.FSDP2Strategy`, which gives the module a device mesh), shard what trains."""
        from lit_llm.transforms import apply_activation_checkpointing, compile_model, shard_stage

        if self.lora_config is not None and not lora_layers(self.model):
            # the base is fingerprinted before the adapters exist: adapter checkpoints name it by this hash
            base = str(Path(self.hparams.init_from).resolve())  # absolute: later commands run from anywhere
            self._lora_base = {"path": base, "sha256": base_fingerprint(self.model)}
            # the adapters' random init from the run's seed alone: what ran before this hook differs between
            # strategies (DDP re-seeds when it sets up, one process does not), so the global stream would
            # give 1 and 2 processes other adapters; forked: the global stream goes on as without LoRA
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed())
                apply_lora(self.model, self.lora_config)
        if self.hparams.get("activation_checkpointing"):
            apply_activation_checkpointing(
                self.model
            )  # before compile: the compiled code holds the checkpoint
        if self.hparams.get("compile"):
            compile_model(self.model)
        if self.device_mesh is not None:  # already sharded children are skipped: the hook runs once per fit
            shard_stage(self, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        """Quiet Lightning's "module(s) in eval mode" warning when every module in eval mode is frozen: the
        reference, reward model or critic of the RL stages is kept in eval mode on purpose. A trainable
        module left in eval mode (a real mistake) still warns."""
        in_eval = [m for m in self.modules() if not m.training]
        if in_eval and not any(p.requires_grad for m in in_eval for p in m.parameters(recurse=False)):
            warnings.filterwarnings(
                "ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning
            )

    # ------------------------------------------------------------------------------------ tokenizer plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.tokenizer is None and dm is not None and hasattr(dm, "tokenizer"):
            self.tokenizer = dm.tokenizer
        elif getattr(dm, "chat_template", None) and self.tokenizer is not None:
            # --data.chat_template: the same vocabulary with another template; checkpoints carry the new one
            if dm.tokenizer.tok.to_str() != self.tokenizer.tok.to_str():
                raise CheckpointError("--data.tokenizer is not the tokenizer of --model.init_from")
            self.tokenizer = dm.tokenizer
        if self.tokenizer is not None and (
            self.tokenizer.vocab_size > self.config.vocab_size
            or (self.hparams.get("init_from") is None and self.tokenizer.vocab_size != self.config.vocab_size)
        ):
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens, model has vocab_size={self.config.vocab_size}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {
            "model_config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
            "stage": self.stage_name,
            "backbone_prefix": "model.",
        }
        if self._lora_base is not None:
            # adapter-only: the frozen base weights are not stored; they come back from the base they name
            checkpoint[META_KEY]["lora"] = {"config": self.lora_config.to_dict(), "base": self._lora_base}
            state = checkpoint["state_dict"]
            for name, p in self.model.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(f"model.{name}", None)
        self._drop_frozen_parts(checkpoint)
        # the RNG state (dropout, sampling) so that a resumed run draws what the uninterrupted one would have
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY)
        if meta is None:
            raise CheckpointError(
                "not a lit_llm checkpoint (no 'lit_llm' entry); was it written by another program?"
            )
        theirs = ModelConfig.from_dict(meta["model_config"])
        diff = self.config.diff(theirs)
        if diff:
            lines = ", ".join(f"{k}: run has {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint was written by a different model config ({lines})")
        if (
            meta.get("tokenizer")
            and self.tokenizer is not None
            and Tokenizer.from_str(meta["tokenizer"]).to_str() != self.tokenizer.to_str()
        ):
            raise CheckpointError(
                "checkpoint was written with a different tokenizer than this run's data uses"
            )
        if meta.get("tokenizer") and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_str(meta["tokenizer"])
        self._restore_frozen_base(checkpoint, meta.get("lora"))
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def _drop_frozen_parts(self, checkpoint: dict[str, Any]) -> None:
        """Take the frozen children's weights out of the checkpoint and name them instead (``frozen``: path and
        hash). A folder of shards (the sharded strategy; its weights are ``DTensor``) keeps them: its resume
        loads the module's whole state dict with ``torch.distributed.checkpoint`` before any hook runs."""
        from torch.distributed.tensor import DTensor

        state = checkpoint["state_dict"]
        if not self._frozen_parts or any(isinstance(v, DTensor) for v in state.values()):
            return
        for name in self._frozen_parts:
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]
        checkpoint[META_KEY]["frozen"] = self.frozen_fingerprints()

    def _restore_frozen_parts(self, checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
        """Resuming: check that each frozen child this run rebuilt (from ``init_from``, ``ref_from``,
        ``reward_model``) has the weights the checkpoint names, and put them back into its state dict, so
        that it loads strictly. A checkpoint that stored them (written before, or a folder of shards) loads
        them as they are."""
        # None: a folder of shards, whose weights the sharded strategy has loaded already (frozen ones it
        # does not hold keep what this run built); only the hashes are checked then
        state = checkpoint.get("state_dict")
        ours = self.frozen_fingerprints() if saved else {}
        for name, theirs in saved.items():
            if name not in ours:
                continue  # this run has no such child (GRPO resumed with kl_coef 0): nothing to load
            if theirs["sha256"] != ours[name]["sha256"]:
                what = self._frozen_parts[name]["what"]
                raise CheckpointError(
                    f"the checkpoint's frozen {what} ({name}) was {theirs['path']} (sha256 "
                    f"{theirs['sha256'][:12]}...), but this run's {ours[name]['path']} has other weights (sha256 "
                    f"{ours[name]['sha256'][:12]}...): resume with the {what} the run started with"
                )
        for name in self._frozen_parts if state is not None else ():
            prefix = f"{name}."
            if not any(k.startswith(prefix) for k in state):
                for k, v in getattr(self, name).state_dict().items():
                    state[prefix + k] = v.detach()

    def _restore_frozen_base(self, checkpoint: dict[str, Any], saved: dict[str, Any] | None) -> None:
        """Resuming a LoRA run: check that the checkpoint's adapters belong to this run's base and put the
        base weights (not stored in the checkpoint) back into its state dict, so that it loads strictly.
        Then the same for the frozen children (``set_frozen``): reference, reward model."""
        self._restore_frozen_parts(checkpoint, checkpoint.get(META_KEY, {}).get("frozen") or {})
        ours = self._lora_base
        if saved is None and ours is None:
            return
        if saved is None or ours is None:
            what = "LoRA adapters" if saved else "full weights"
            want = "this run has no --model.lora" if saved else "this run trains LoRA adapters"
            raise CheckpointError(f"the checkpoint holds {what} but {want}: resume with the run's own config")
        if saved["base"]["sha256"] != ours["sha256"]:
            raise CheckpointError(
                f"the checkpoint's adapters were trained on the base {saved['base']['path']} (sha256 "
                f"{saved['base']['sha256'][:12]}...), but this run's init_from {ours['path']} has other weights "
                f"(sha256 {ours['sha256'][:12]}...): resume on the same base"
            )
        if saved["config"] != self.lora_config.to_dict():
            raise CheckpointError(
                f"the checkpoint's LoRA config {saved['config']} differs from this run's {self.lora_config.to_dict()}"
            )
        state = checkpoint.get("state_dict")  # None: a folder of shards, loaded by the strategy already
        for name, p in self.model.named_parameters(remove_duplicate=False) if state is not None else ():
            if not p.requires_grad:
                state.setdefault(f"model.{name}", p.detach())

    def on_train_start(self) -> None:
        """On resume, continue the RNG stream where the checkpoint left it (just before the next step)."""
        state, self._rng_to_restore = self._rng_to_restore, None
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # decided together, so that a NaN on one rank stops every rank (instead of leaving the others waiting)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            ckpt = Path(self.trainer.default_root_dir)
            raise FloatingPointError(
                f"{self.stage_name}: loss is {loss.item()} (on this or another rank) at step {self.global_step}; "
                f"stopping. The last good checkpoint (if any, under {ckpt}) was not overwritten. Lower the "
                "learning rate or check the data."
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def configure_optimizers(self):
        opt = self.build_optimizer(self, self.hparams.learning_rate)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler(opt), "interval": "step"}}

    def build_optimizer(self, module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The stage's optimizer choice (AdamW, or Muon beside AdamW) over ``module``'s trainable parameters."""
        hp = self.hparams
        return build_optimizer(
            module,
            hp.get("optimizer", "adamw"),  # checkpoints written before the choice existed: AdamW
            lr=lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            muon_lr=hp.get("muon_lr"),
            muon_momentum=hp.get("muon_momentum", 0.95),
            muon_adjust_lr=hp.get("muon_adjust_lr", "match_rms_adamw"),
        )

    def lr_scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at the run's last step."""
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, max(total - 1, 0))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup, total, hp.min_lr_ratio))

    def log_gold_score(self, max_new_tokens: int) -> None:
        """Log ``val/exact_match``: the DataModule's gold scorer on greedy replies to its held-out prompts.

        Does nothing when the data provides no scorer or prompts (``gold_reward``, ``eval_prompts()``), or
        during Lightning's sanity check. The first replies become the TensorBoard samples (``sample_texts``).
        """
        scorer = self.data_hook("gold_reward")
        records = self.data_hook("eval_prompts", lambda: [])()
        if scorer is None or not records or self.trainer.sanity_checking:
            return
        with gathered(self.model):
            score, replies = gold_score(self.model, self.tokenizer, records, scorer, max_new_tokens)
        self.log("val/exact_match", score, prog_bar=True, rank_zero_only=True)
        self._samples = [(r["prompt"], reply) for r, reply in zip(records[:4], replies)]

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``x`` reduced over the ranks (``"sum"`` or ``"mean"``); itself on a single process."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return x
        return trainer.strategy.reduce(x, reduce_op=op)

    def token_weight(self, mask: torch.Tensor) -> torch.Tensor:
        """The factor that makes a token-mean loss of this rank's minibatch average correctly over ranks.

        DDP and FSDP average the gradients of the ranks' losses. A rank's token-mean divides by its own
        token count, so the average of the ranks' means weighs a token of a short minibatch more than one
        of a long one, unlike one process holding the whole global minibatch. Multiplied by ``n_rank /
        mean_n`` (this rank's real tokens over the mean count of the ranks), every rank's loss is its token
        sum over the mean count, and their average is the global token sum over the global count: the
        single-process loss. 1 on one process."""
        n = mask.sum().float().detach()
        return n / self.reduce(n.clone(), "mean").clamp_min(1.0)

    def data_hook(self, name: str, default: Any = None) -> Any:
        """What the DataModule provides for this stage (``eval_prompts``, ``gold_reward``, ...), or ``default``.

        Dataset knowledge (held-out prompts, gold scorers, sample texts) lives with the data, so a stage runs
        on any dataset that provides it.
        """
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(dm, name, default) if dm is not None else default


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# reward functions that moved: the old spec is refused with the new one named
_RENAMED = {"lit_llm.stages.ppo:tinyworld_gold": "lit_llm.data.tinyworld:gold_score"}


def import_reward_fn(spec: str) -> Callable[[dict, str], float]:
    """``"package.module:function"`` -> the function ``(record, reply) -> float``."""
    if spec in _RENAMED:
        raise UserError(f"{spec} was renamed: use {_RENAMED[spec]}")
    return import_function(spec)


class RLStage(Stage):
    """What the online RL stages (PPO, GRPO) share on top of :class:`Stage`.

    Manual optimisation (one training batch of prompts = one iteration: sample, score, several updates); the
    reward sources (a reward model, a Python function, or their weighted sum, plus a gold reward that is
    logged and never optimised); the policy's optimizer; validation on held-out prompts (greedy replies,
    ``val/<part>`` per reward part, ``val/gold_reward``); a table of sampled replies in TensorBoard.
    Subclasses call :meth:`init_rewards` after ``Stage.__init__`` and implement ``training_step``.
    """

    def init_rewards(
        self,
        reward_model: str | None,
        reward_fn: str | None,
        reward_model_weight: float,
        reward_fn_weight: float,
        gold_fn: str | None,
    ) -> None:
        """Load the frozen reward model (``self.rm``) and build ``self.rewards`` (a ``RewardSources``)."""
        name, init_from = self.stage_name.upper(), self.hparams.init_from
        if init_from is None:
            raise UserError(f"{name} starts from an SFT model: set --model.init_from path/to/sft.ckpt")
        if reward_model is None and reward_fn is None:
            raise UserError(
                f"{name} needs a reward: set --model.reward_model path/to/reward.ckpt and/or "
                "--model.reward_fn module:function"
            )
        self.automatic_optimization = False
        self.rm: RewardModel | None = None
        if reward_model is not None:
            rm, rm_tok = RewardModel.load(reward_model)
            self.set_frozen("rm", rm, reward_model, "reward model")
            if rm_tok.to_str() != self.tokenizer.to_str():
                raise CheckpointError(
                    f"{reward_model} uses a different tokenizer than the policy {init_from}"
                )
        self.rewards = RewardSources(
            self.tokenizer,
            self.rm,
            import_reward_fn(reward_fn) if reward_fn else None,
            reward_model_weight,
            reward_fn_weight,
            import_reward_fn(gold_fn) if gold_fn else None,
            reward_model_name=f"reward model {reward_model}",
        )

    def score_replies(
        self, records: list[dict], replies: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward ``(B,)`` and its parts by name (with the gold reward: the DataModule's by default)."""
        return self.rewards(records, replies, self.device, self.data_hook("gold_reward"))

    def step_schedulers(self) -> None:
        """Advance every learning-rate schedule by one iteration (manual optimisation steps them itself)."""
        scheds = self.lr_schedulers() or []
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            sched.step()

    def validation_step(self, records: list[dict], batch_idx: int) -> None:
        with gathered(self.model):
            replies = chat_completions(
                self.model, self.tokenizer, [r["prompt"] for r in records], self.hparams.eval_max_new_tokens
            )
        _, parts = self.score_replies(records, replies)
        for k, v in parts.items():
            name = "gold_reward" if k == "gold" else k
            self.log(
                f"val/{name}", v.float().mean(), prog_bar=k == "gold", batch_size=len(records), sync_dist=True
            )
        self._val_samples = list(zip([r["prompt"] for r in records[:6]], replies[:6]))

    def sample_texts(self) -> list[tuple[str, str]]:
        return getattr(self, "_val_samples", [])

    @rank_zero_only
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Every 25 iterations, a table of this iteration's prompts, replies and rewards in TensorBoard."""
        exp = getattr(self.logger, "experiment", None)
        last = getattr(self, "_last_rollout", None)
        if exp is None or not hasattr(exp, "add_text") or last is None or batch_idx % 25:
            return
        exp.add_text("rollouts", rollout_table(*last), self.global_step)
