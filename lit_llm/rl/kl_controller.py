"""Controllers for the KL-penalty coefficient ``beta`` used in :func:`lit_llm.rl.compute_rewards`."""

from __future__ import annotations


class FixedKLController:
    """Constant KL coefficient.

    Args:
        value: The KL coefficient ``beta``.
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; kept for interface compatibility with :class:`AdaptiveKLController`.

        Args:
            current_kl: Observed KL between policy and reference (ignored).
            n_steps: Number of samples / steps since the last update (ignored).
        """

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the policy-reference KL towards a target (Ziegler et al. 2019).

    On every update: ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + e * n_steps / horizon``. A KL above the target increases the penalty, below decreases it.

    Args:
        init_kl_coef: Initial KL coefficient ``beta``.
        target: Target KL value (must be > 0).
        horizon: Horizon (in samples/steps) over which the coefficient adapts (must be > 0).

    Raises:
        ValueError: If ``target`` or ``horizon`` is not positive.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}.")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``self.value`` from the KL measured over the last ``n_steps`` samples.

        Args:
            current_kl: Observed mean KL between policy and reference (Python float).
            n_steps: Number of samples / steps since the last update (typically the batch size).
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The adapted coefficient (and its settings), for a checkpoint: a resume continues from it."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by :meth:`state_dict` (the target and horizon stay this run's)."""
        self.value = float(state["value"])
