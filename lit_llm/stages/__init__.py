"""One LightningModule per stage, each holding the shared backbone as ``self.model``."""

from lit_llm.stages.base import Stage
from lit_llm.stages.causal_lm import CausalLM
from lit_llm.stages.dpo import DPOModule
from lit_llm.stages.grpo import GRPOModule
from lit_llm.stages.ppo import PPOModule
from lit_llm.stages.reward import RewardModule
from lit_llm.stages.sft import SFTModule

__all__ = ["CausalLM", "DPOModule", "GRPOModule", "PPOModule", "RewardModule", "SFTModule", "Stage"]
