"""Mixture-of-Experts feed-forward layer (Switch / Mixtral / Llama 4 / DeepSeek-V3 options).

A router (a linear map without bias) scores ``E`` experts for every token and sends the token to the top
``k``; a shared expert, when configured, sees every token. The experts are SwiGLU MLPs whose weights are
stacked into two tensors, ``(E, C, 2H)`` and ``(E, H, C)``, so one layer holds ``E`` experts in two
parameters.

Dispatch without a loop over tokens::

    (token, choice) pairs  --sort by expert-->  rows grouped by expert  --grouped matmuls-->  outputs
    outputs * gate  --index_add back to their tokens-->  (N, C)

The grouped matmul is ``torch.nn.functional.grouped_mm`` on CUDA (one kernel for all experts) and, on
other devices, a loop over the ``E`` experts, each taking its contiguous segment of the sorted rows (a
handful of large matmuls; no boolean masks, no per-token work). Benchmarks: ``benchmarks/moe.py``.

Training losses are not computed here. Each forward pass stores its router logits, chosen experts and
per-expert token counts on the layer (``last_router_logits``, ``last_top_k_indices``,
``last_expert_counts``); the training stage asks :func:`moe_aux_losses` for the load-balancing and z-losses
of the last forward pass and adds them to its objective.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.mlp import SwiGLU

GroupedImpl = Literal["auto", "loop", "grouped_mm"]


def _grouped_mm_usable(x: torch.Tensor, hidden: int) -> bool:
    """``F.grouped_mm`` where it is a fast kernel: CUDA, bf16, rows aligned to 16 bytes."""
    return (
        hasattr(F, "grouped_mm")
        and x.is_cuda
        and _compute_dtype(x) == torch.bfloat16
        and x.shape[-1] % 8 == 0
        and hidden % 8 == 0
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def grouped_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: torch.Tensor,
    impl: GroupedImpl = "auto",
) -> torch.Tensor:
    """SwiGLU of each row with its own expert's weights; rows come grouped by expert.

    Args:
        x: ``(M, C)`` rows, the first ``counts[0]`` for expert 0, the next ``counts[1]`` for expert 1, ...
        gate_up: ``(E, C, 2H)`` stacked ``[gate | up]`` weights (``x @ W`` layout).
        down: ``(E, H, C)`` stacked down projections.
        counts: ``(E,)`` rows per expert (summing to ``M``).
        impl: ``grouped_mm`` (one fused kernel), ``loop`` (one matmul per expert on its segment) or
            ``auto`` (``grouped_mm`` on CUDA in bf16, else ``loop``).

    Returns:
        ``(M, C)``: row ``i`` is ``down_e(silu(x_i @ gate_e) * (x_i @ up_e))`` for its expert ``e``.
    """
    hidden = down.shape[1]
    if impl == "auto":
        impl = "grouped_mm" if _grouped_mm_usable(x, hidden) else "loop"
    if impl == "grouped_mm":
        dtype = _compute_dtype(x)
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        h = F.grouped_mm(x.to(dtype), gate_up.to(dtype), offs=offs)  # (M, 2H)
        g, u = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(g) * u, down.to(dtype), offs=offs)  # (M, C)
    if impl != "loop":
        raise ValueError(f"impl must be 'auto', 'loop' or 'grouped_mm', got {impl!r}")
    outs = []
    # unbind, not gate_up[e]: indexing a stacked parameter E times would make E full-size (E, C, 2H)
    # gradient buffers in the backward pass; unbind's backward stacks the E slices once
    w_gate_up, w_down = gate_up.unbind(0), down.unbind(0)
    for e, seg in enumerate(x.split(counts.tolist())):  # E iterations, each one matmul on a segment
        if seg.shape[0] == 0:
            continue
        g, u = (seg @ w_gate_up[e]).chunk(2, dim=-1)  # (n_e, H) each
        outs.append((F.silu(g) * u) @ w_down[e])  # (n_e, C)
    if not outs:
        return x.new_zeros(0, down.shape[-1])
    return torch.cat(outs)


class Experts(nn.Module):
    """``E`` SwiGLU experts held as stacked weights.

    Args:
        n_expert: Number of experts ``E``.
        dim: Model width ``C``.
        hidden: Hidden width of one expert ``H``.

    Attributes:
        gate_up_proj: ``(E, C, 2H)``: ``x @ gate_up_proj[e]`` gives the gate (first ``H``) and up halves.
        down_proj: ``(E, H, C)``.
        impl: How the grouped matmul runs (see :func:`grouped_swiglu`); a plain attribute, not config.
    """

    def __init__(self, n_expert: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_expert, self.dim, self.hidden = n_expert, dim, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_expert, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(n_expert, hidden, dim))
        self.impl: GroupedImpl = "auto"
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, down_std: float | None = None) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, std)
        nn.init.normal_(self.down_proj, 0.0, std if down_std is None else down_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` ``(M, C)`` grouped by expert (``counts`` ``(E,)``) -> ``(M, C)``."""
        return grouped_swiglu(x, self.gate_up_proj, self.down_proj, counts, self.impl)

    def extra_repr(self) -> str:
        return f"n_expert={self.n_expert}, dim={self.dim}, hidden={self.hidden}"


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional shared expert.

    Args:
        config: Uses ``n_embd``, ``moe_n_expert``, ``moe_top_k``, ``moe_intermediate_size``,
            ``moe_shared_expert``, ``moe_score``, ``moe_renormalize``, ``moe_weight_input``,
            ``moe_bias_update`` and the two loss coefficients.

    Attributes:
        last_router_logits: ``(N, E)`` float32 router logits of the last forward pass (``N = B * T``),
            still attached to the autograd graph in training.
        last_top_k_indices: ``(N, k)`` experts chosen for each token in the last forward pass.
        last_expert_counts: ``(E,)`` tokens routed to each expert in the last forward pass.
        expert_bias: ``(E,)`` selection bias (only with ``moe_bias_update``; a buffer saved in checkpoints).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_expert, self.top_k = config.moe_n_expert, config.moe_top_k
        self.score = config.moe_score
        self.renormalize, self.weight_input = config.moe_renormalize, config.moe_weight_input
        self.aux_loss_coef, self.z_loss_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        hidden = config.moe_intermediate_size
        self.router = nn.Linear(config.n_embd, self.n_expert, bias=False)
        self.experts = Experts(self.n_expert, config.n_embd, hidden)
        self.shared_expert = SwiGLU(config.n_embd, hidden) if config.moe_shared_expert else None
        self.expert_bias: torch.Tensor | None
        self.load_since_update: torch.Tensor | None
        if config.moe_bias_update:
            self.register_buffer("expert_bias", torch.zeros(self.n_expert))
            self.register_buffer("load_since_update", torch.zeros(self.n_expert), persistent=False)
        else:
            self.expert_bias = None
            self.load_since_update = None
        self.last_router_logits: torch.Tensor | None = None
        self.last_top_k_indices: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``(N, E)`` (float32), chosen experts ``(N, k)`` and their gates ``(N, k)`` (float32).

        ``softmax``: gates are the softmax probabilities of the chosen experts (renormalised to sum one with
        ``moe_renormalize``). ``sigmoid``: gates are the sigmoids of the chosen logits. Without a bias the
        choice is the top-k logits (both scores are monotone in the logit); with ``moe_bias_update`` it is
        the top-k of ``score + expert_bias``, while the gates stay unbiased (DeepSeek-V3).
        """
        logits = self.router(x).float()  # (N, E)
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()  # (N, E)
        if self.expert_bias is None:
            top_idx = logits.topk(self.top_k, dim=-1).indices  # (N, k)
        else:
            top_idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, top_idx)  # (N, k)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return logits, top_idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``; records the routing of this pass on the layer."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits, top_idx, gates = self.route(flat)
        k = self.top_k
        flat_expert = top_idx.reshape(-1)  # (N*k,) expert of each (token, choice) pair
        order = torch.argsort(flat_expert, stable=True)  # pairs grouped by expert
        token = order // k  # (N*k,) token of each sorted pair
        gate = gates.reshape(-1)[order]  # (N*k,)
        counts = torch.bincount(flat_expert, minlength=self.n_expert)  # (E,)
        rows = flat[token]  # (N*k, C) gathered, grouped by expert
        if self.weight_input:  # Llama 4 scales what goes into the expert
            rows = (rows * gate[:, None]).to(rows.dtype)
        out_rows = self.experts(rows, counts)  # (N*k, C)
        if not self.weight_input:  # Switch / Mixtral scale what comes out
            out_rows = out_rows * gate[:, None].to(out_rows.dtype)
        out = torch.zeros(flat.shape[0], C, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, out_rows.float())  # (N, C) sum over each token's k experts
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat).float()
        self.last_router_logits, self.last_top_k_indices = logits, top_idx
        self.last_expert_counts = counts.detach()
        if self.training and self.load_since_update is not None:
            self.load_since_update += counts.detach().to(self.load_since_update.dtype)
        return out.to(x.dtype).view(B, T, C)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Auxiliary-loss-free balancing step: ``bias += rate * sign(mean_load - load)``.

        ``load`` counts the tokens each expert received in the training forward passes since the previous
        call (then resets), so overloaded experts become less likely to be chosen and idle ones more. Call it
        once per optimizer step. Under data parallelism each rank sees its own load; DDP's buffer broadcast
        then keeps rank 0's bias everywhere.
        """
        if self.expert_bias is None or self.load_since_update is None:
            raise ValueError("this MoE layer has no expert bias; build the model with moe_bias_update=True")
        load = self.load_since_update
        if float(load.sum()) == 0:
            return
        self.expert_bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def __getstate__(self) -> dict[str, Any]:
        # the stored routing of the last pass may hold an autograd graph: never copy or pickle it
        state = self.__dict__.copy()
        state.update(last_router_logits=None, last_top_k_indices=None, last_expert_counts=None)
        return state

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, score={self.score}, weight_input={self.weight_input}, "
            f"bias_update={self.expert_bias is not None}"
        )


# ----------------------------------------------------------------------------------------- losses (pure)
def load_balancing_loss(
    router_logits: torch.Tensor, top_k_indices: torch.Tensor, n_expert: int
) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus et al., 2021, eq. 4).

    ``f_e`` is the fraction of (token, choice) assignments that went to expert ``e`` (a count, no
    gradient) and ``P_e`` the mean softmax probability of expert ``e`` over the tokens (differentiable).
    With top-k routing the fraction is taken over the ``N * k`` assignments, so a perfectly balanced router
    scores exactly 1 for every ``k`` (Hugging Face's Mixtral loss equals ``k`` times this value). The
    softmax is used whatever the layer's scoring (for sigmoid routers it is the differentiable proxy).

    Args:
        router_logits: ``(..., E)`` logits.
        top_k_indices: ``(..., k)`` chosen experts of the same tokens.
        n_expert: ``E``.
    """
    probs = router_logits.float().reshape(-1, n_expert).softmax(-1)  # (N, E)
    counts = torch.bincount(top_k_indices.reshape(-1), minlength=n_expert)  # (E,)
    fraction = counts.to(probs.dtype) / top_k_indices.numel()  # (E,)
    return n_expert * (fraction * probs.mean(0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_tokens(logsumexp(logits)^2)`` (Zoph et al., 2022, ST-MoE eq. 5).

    Keeps router logits small, which keeps the softmax (and bf16 arithmetic) well conditioned.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


# ------------------------------------------------------------------------------------ model-level helpers
def moe_layers(model: nn.Module) -> list[MoE]:
    """Every :class:`MoE` layer of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary losses of the model's last forward pass, averaged over its MoE layers.

    Returns an empty dict for a model without MoE layers, else::

        {"loss":            aux_loss_coef * load_balancing + z_loss_coef * router_z   (add to the objective),
         "load_balancing":  mean over layers of load_balancing_loss   (1.0 = perfectly balanced),
         "router_z":        mean over layers of router_z_loss,
         "max_load":        max over layers and experts of load / mean load, detached (1.0 = balanced)}

    Raises:
        ValueError: if a MoE layer has not run a forward pass yet.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    balance, z, max_load = [], [], []
    for i, m in enumerate(layers):
        if m.last_router_logits is None or m.last_top_k_indices is None or m.last_expert_counts is None:
            raise ValueError(f"MoE layer {i} has no routing stored: run a forward pass before moe_aux_losses")
        balance.append(load_balancing_loss(m.last_router_logits, m.last_top_k_indices, m.n_expert))
        z.append(router_z_loss(m.last_router_logits))
        counts = m.last_expert_counts.float()
        max_load.append(counts.max() / counts.mean().clamp(min=1e-9))
    lb, rz = torch.stack(balance).mean(), torch.stack(z).mean()
    first = layers[0]
    return {
        "loss": first.aux_loss_coef * lb + first.z_loss_coef * rz,
        "load_balancing": lb,
        "router_z": rz,
        "max_load": torch.stack(max_load).max().detach(),
    }


def expert_load(model: nn.Module) -> torch.Tensor:
    """Fraction of the last pass's assignments per expert, ``(n_moe_layers, E)`` (rows sum to 1)."""
    rows = []
    for m in moe_layers(model):
        if m.last_expert_counts is None:
            raise ValueError("a MoE layer has no routing stored: run a forward pass first")
        counts = m.last_expert_counts.float()
        rows.append(counts / counts.sum().clamp(min=1))
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def update_moe_biases(model: nn.Module, rate: float) -> None:
    """Call :meth:`MoE.update_bias` on every MoE layer (models built with ``moe_bias_update``)."""
    for m in moe_layers(model):
        m.update_bias(rate)
