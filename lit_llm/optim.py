"""Optimizers: AdamW, or Muon for the hidden weight matrices beside AdamW for everything else.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) replaces a matrix's momentum by its
nearest semi-orthogonal matrix (all singular values near one), computed by a few Newton-Schulz iterations,
so every direction of the update moves by the same amount. It applies to the 2-D weights of hidden layers
only; the recipe (modded-nanogpt, nanochat, Moonlight / Kimi K2) keeps AdamW for what is not a hidden
matrix:

==========================================  ==========  =============================  ===============
parameter                                   optimizer   learning rate                  weight decay
==========================================  ==========  =============================  ===============
``nn.Linear`` weights of the blocks         Muon        ``muon_lr`` x shape factor     ``weight_decay``
(attention, MLP, MoE router, shared
expert)
stacked MoE experts ``(E, C, 2H)``,         Muon, one   ``muon_lr`` x shape factor     ``weight_decay``
``(E, H, C)``                               matrix per  of one expert's matrix
                                            expert (and
                                            gate / up
                                            apart)
embeddings, output and value heads          AdamW       ``lr``                         ``weight_decay``
norms, biases, other vectors                AdamW       ``lr``                         0
any other parameter of 2 or more dims       AdamW       ``lr``                         ``weight_decay``
==========================================  ==========  =============================  ===============

Both kinds live in one :class:`MuonAdamW` optimizer (Lightning's automatic optimisation steps exactly one
optimizer), each kind in its own parameter groups; a scheduler such as ``LambdaLR`` scales every group's
learning rate by the same factor, so the warmup + cosine schedule is shared.

The Muon math follows ``torch.optim.Muon`` (torch >= 2.9; tested for parity where it exists) and adds what
it lacks: batches of matrices, so each expert of a stacked MoE weight is orthogonalised on its own, and
torch < 2.9 (the project supports torch >= 2.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lit_llm.backbone.moe import Experts

OptimizerName = Literal["adamw", "muon"]
AdjustLR = Literal["original", "match_rms_adamw"]

# Newton-Schulz quintic coefficients of Keller Jordan's Muon (the same as torch.optim.Muon's)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
# modules whose 2-D weight is an input or output map of the network, not a hidden layer: AdamW
HEAD_NAMES = ("lm_head", "value_head")


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (``ndim >= 2``), none on norms, biases and other vectors.

    Frozen parameters are left out; a parameter shared by several modules (a tied embedding) appears once.
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------- Newton-Schulz
def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """Approximately ``U V^T`` of ``g = U S V^T`` for each matrix of ``g`` ``(..., A, B)``, in bfloat16.

    Five steps of the quintic Newton-Schulz iteration of ``torch.optim.Muon`` (and Keller Jordan's Muon):
    they push the singular values into roughly [0.7, 1.2] rather than exactly to 1, which trains as well
    and costs far fewer steps. The leading dimensions are a batch: every matrix is orthogonalised alone.

    Args:
        g: ``(..., A, B)`` matrices (a momentum).
        steps: Newton-Schulz iterations.
        eps: Floor of the Frobenius norm that scales each matrix's spectral norm to at most 1.

    Returns:
        ``(..., A, B)`` bfloat16 matrices with singular values near 1.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius >= spectral norm: now <= 1
    batch = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # (N, A, B): baddbmm wants one batch dimension
    for _ in range(steps):  # X <- aX + b(XX^T)X + c(XX^T)^2 X, fused as torch.optim.Muon does it
        gram = x @ x.mT  # (N, A, A)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G G
        x = torch.baddbmm(x, gram_update, x, beta=a)  # a X + (b G + c G G) X
    x = x.reshape(*batch, *x.shape[-2:])
    return x.mT if tall else x


def adjusted_lr(lr: float, fan_out: int, fan_in: int, adjust: AdjustLR) -> float:
    """Muon's learning rate for one ``(fan_out, fan_in)`` matrix (``torch.optim.Muon``'s ``adjust_lr_fn``).

    ``original`` (Keller Jordan): ``lr * sqrt(max(1, fan_out / fan_in))``, so tall matrices, whose
    orthogonal update has a smaller RMS, move as much per element as square ones. ``match_rms_adamw``
    (Moonlight, Liu et al., 2025): ``lr * 0.2 * sqrt(max(fan_out, fan_in))``, which gives the update the RMS
    of a typical AdamW update, so Muon reuses AdamW's learning rate and weight decay.

    Args:
        lr: The group's (scheduled) learning rate.
        fan_out: Output features of the matrix.
        fan_in: Input features of the matrix.
        adjust: ``original`` or ``match_rms_adamw``.
    """
    if adjust == "original":
        return lr * math.sqrt(max(1.0, fan_out / fan_in))
    if adjust == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(fan_out, fan_in))
    raise ValueError(f"muon adjust_lr must be 'original' or 'match_rms_adamw', got {adjust!r}")


def as_matrices(t: torch.Tensor, layout: str, chunks: int) -> torch.Tensor:
    """The matrices Muon orthogonalises, as ``(N, fan_out, fan_in)``.

    ``linear``: an ``nn.Linear`` weight ``(out, in)``, one matrix. ``in_out``: stacked expert weights
    ``(E, in, chunks * out)`` used as ``x @ W`` (``Experts``); the last dimension holds ``chunks`` matrices
    side by side (the ``[gate | up]`` halves), each orthogonalised alone like a dense SwiGLU's ``gate_proj``
    and ``up_proj``. :func:`from_matrices` inverts it.
    """
    if layout == "linear":
        return t.unsqueeze(0)  # (1, out, in)
    E, fan_in, width = t.shape
    m = t.reshape(E, fan_in, chunks, width // chunks)  # (E, in, chunks, out)
    return m.permute(0, 2, 3, 1).reshape(E * chunks, width // chunks, fan_in)  # (E * chunks, out, in)


def from_matrices(m: torch.Tensor, shape: torch.Size, layout: str, chunks: int) -> torch.Tensor:
    """Inverse of :func:`as_matrices`: ``(N, fan_out, fan_in)`` back to the parameter's ``shape``."""
    if layout == "linear":
        return m.reshape(shape)
    E, fan_in, width = shape
    m = m.reshape(E, chunks, width // chunks, fan_in)  # (E, chunks, out, in)
    return m.permute(0, 3, 1, 2).reshape(shape)  # (E, in, chunks * out)


# ------------------------------------------------------------------------------------------ optimizer
class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``use_muon``, AdamW for the others, in one optimizer.

    One optimizer, so Lightning's automatic optimisation, gradient clipping, ``LambdaLR`` and checkpoints
    (``state_dict`` holds both kinds of state) work unchanged. Build the groups with
    :func:`muon_param_groups` (or :func:`build_optimizer`).

    Muon group keys: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr``,
    ``layout`` and ``chunks`` (see :func:`as_matrices`). Its step, as ``torch.optim.Muon``'s::

        buf = momentum * buf + (1 - momentum) * grad          (state "momentum_buffer")
        u = (1 - momentum) * grad + momentum * buf            (Nesterov; else u = buf)
        p = p * (1 - lr * weight_decay) - adjusted_lr(lr) * orthogonalize(u)   per matrix

    AdamW group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``; its step is ``torch.optim.AdamW``'s
    (decoupled decay, bias-corrected moments; state ``step``, ``exp_avg``, ``exp_avg_sq``).

    Args:
        params: Parameter groups, each with ``use_muon`` set.
        lr: Default learning rate of a group that sets none.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 1e-3) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": 0.0,
            "use_muon": False,
            "momentum": 0.95,
            "nesterov": True,
            "ns_steps": NS_STEPS,
            "adjust_lr": "match_rms_adamw",
            "layout": "linear",
            "chunks": 1,
            "betas": (0.9, 0.95),
            "eps": 1e-8,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                want = 2 if group["layout"] == "linear" else 3
                if p.ndim != want:
                    raise ValueError(
                        f"a Muon group with layout {group['layout']!r} takes {want}-D parameters, got "
                        f"{tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; ``closure`` recomputes the loss first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        layout, chunks = group["layout"], group["chunks"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            sharded = isinstance(update, DTensor)  # FSDP2: this rank holds some rows of the matrix
            if sharded:
                # orthogonalisation is a property of the whole matrix, not of a block of its rows: gather it,
                # orthogonalise it (the same result on every rank, as under DDP), keep this rank's rows
                mesh, placements = update.device_mesh, update.placements
                update = update.full_tensor()
            matrices = as_matrices(update, layout, chunks)  # (N, fan_out, fan_in)
            ortho = from_matrices(orthogonalize(matrices, group["ns_steps"]), update.shape, layout, chunks)
            if sharded:  # every rank has the whole result: each cuts out its own share, no communication
                ortho = distribute_tensor(ortho, mesh, placements, src_data_rank=None)
            step_lr = adjusted_lr(lr, matrices.shape[-2], matrices.shape[-1], group["adjust_lr"])
            p.mul_(1 - lr * wd)  # decoupled decay with the group's lr, as torch.optim.Muon
            p.add_(ortho.to(p.dtype), alpha=-step_lr)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


# ---------------------------------------------------------------------------------------------- groups
def split_parameters(
    module: nn.Module, head_names: Iterable[str] = HEAD_NAMES
) -> dict[str, list[nn.Parameter]]:
    """Sort the trainable parameters of ``module`` by how Muon treats them; each appears in one list.

    Returns:
        ``muon``: weights of ``nn.Linear`` layers (``(out, in)``) except the heads named in ``head_names``;
        ``muon_gate_up`` / ``muon_down``: stacked expert weights of :class:`Experts`; ``adamw_decay``:
        embeddings, heads and any other parameter of 2 or more dimensions; ``adamw_no_decay``: norms,
        biases and other vectors. Frozen parameters are left out; a shared (tied) parameter appears once,
        where it is met first (the embedding comes before the head it is tied to).
    """
    heads = set(head_names)
    out: dict[str, list[nn.Parameter]] = {
        k: [] for k in ("muon", "muon_gate_up", "muon_down", "adamw_decay", "adamw_no_decay")
    }
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_head = mod_name.rsplit(".", 1)[-1] in heads
            if isinstance(mod, nn.Linear) and p_name == "weight" and not is_head:
                out["muon"].append(p)
            elif isinstance(mod, Experts):
                out["muon_gate_up" if p_name == "gate_up_proj" else "muon_down"].append(p)
            else:  # embeddings, heads, norms, biases, unknown layouts
                out["adamw_decay" if p.ndim >= 2 else "adamw_no_decay"].append(p)
    return out


def muon_param_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float,
    muon_momentum: float = 0.95,
    muon_adjust_lr: AdjustLR = "match_rms_adamw",
    head_names: Iterable[str] = HEAD_NAMES,
) -> list[dict[str, Any]]:
    """Parameter groups of :class:`MuonAdamW` for ``module`` (the table in this module's docstring).

    Args:
        module: The model (or a LightningModule, or a model with a value head).
        lr: Peak learning rate of the AdamW groups.
        weight_decay: Decoupled weight decay of every matrix (Muon and AdamW); none on vectors.
        betas: AdamW betas.
        muon_lr: Peak learning rate of the Muon groups, before the shape adjustment.
        muon_momentum: Muon's (Nesterov) momentum.
        muon_adjust_lr: Shape adjustment of Muon's learning rate (see :func:`adjusted_lr`).
        head_names: Names of the ``nn.Linear`` modules that are heads (AdamW, not Muon).
    """
    parts = split_parameters(module, head_names)
    muon = {
        "use_muon": True,
        "lr": muon_lr,
        "weight_decay": weight_decay,
        "momentum": muon_momentum,
        "nesterov": True,
        "ns_steps": NS_STEPS,
        "adjust_lr": muon_adjust_lr,
    }
    adamw = {"use_muon": False, "lr": lr, "betas": tuple(betas), "eps": 1e-8}
    groups = [
        {"params": parts["muon"], **muon, "layout": "linear", "chunks": 1},
        {"params": parts["muon_gate_up"], **muon, "layout": "in_out", "chunks": 2},
        {"params": parts["muon_down"], **muon, "layout": "in_out", "chunks": 1},
        {"params": parts["adamw_decay"], **adamw, "weight_decay": weight_decay},
        {"params": parts["adamw_no_decay"], **adamw, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    module: nn.Module,
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_adjust_lr: AdjustLR = "match_rms_adamw",
    head_names: Iterable[str] = HEAD_NAMES,
) -> torch.optim.Optimizer:
    """The optimizer of a stage: ``torch.optim.AdamW`` or :class:`MuonAdamW`.

    Args:
        module: The trainable model; its frozen parameters are left out.
        name: ``adamw``: AdamW on everything (weight decay on matrices only). ``muon``: Muon on the hidden
            matrices, AdamW on embeddings, heads, norms and biases.
        lr: Peak AdamW learning rate.
        weight_decay: Decoupled weight decay of matrices.
        betas: AdamW betas.
        muon_lr: Peak Muon learning rate; ``None`` uses ``lr`` (natural with ``match_rms_adamw``).
        muon_momentum: Muon's momentum.
        muon_adjust_lr: Muon's learning-rate adjustment for matrix shape (see :func:`adjusted_lr`).
        head_names: Names of the ``nn.Linear`` modules that are heads (AdamW, not Muon).
    """
    if name == "adamw":
        return torch.optim.AdamW(
            param_groups(module.named_parameters(), weight_decay), lr=lr, betas=tuple(betas)
        )
    if name == "muon":
        groups = muon_param_groups(
            module,
            lr,
            weight_decay,
            betas,
            lr if muon_lr is None else muon_lr,
            muon_momentum,
            muon_adjust_lr,
            head_names,
        )
        return MuonAdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'adamw' or 'muon', got {name!r}")
