"""Host-side schedules of the per-step route probabilities (see ``routing.route_for_step``).

``b`` is the normalised base weight vector (``routing.normalized_weights``); ``weights(step)`` is
the distribution from which the route of optimizer step ``step`` is drawn.

* fixed: ``w = b`` at every step.
* curriculum: linear interpolation from ``b`` to the normalised ``end`` weights ``e`` over
  ``curriculum_steps`` steps: ``a = min(step / curriculum_steps, 1)``, ``w = (1 - a) b + a e``.
* adaptive: routes with a higher running loss are drawn more often. Each route m keeps an
  exponential moving average of its losses, ``ema_m <- d ema_m + (1 - d) loss`` (``d`` =
  ``ema_decay``; the first loss seeds it). The score ``s_m`` is ``ema_m``, or the mean of the seen
  routes' emas for a route not seen yet, clipped at 0; then

      w = floor b + (1 - floor) normalise(b s^(1/T))

  (``T`` = ``temperature``; ``b`` itself where ``b s^(1/T)`` is all zero, or no route was seen
  yet). Every route with ``b_m > 0`` keeps at least ``floor b_m``.

``observe(route, loss)`` lags one step so the host never waits for the step it just dispatched:
the pair is kept pending and the previous pending pair is folded in (``float`` on that loss only
waits for the step before). So ``weights(s + 1)`` reflects the losses of steps ``<= s - 1``.
Non-finite losses are ignored. Fixed and curriculum schedules ignore ``observe`` (no device sync).
"""

import math
from typing import Sequence

import numpy as np

from danceopd_jax.core.routing import normalized_weights

SCHEDULES = ("fixed", "adaptive", "curriculum")


class RouteWeights:
    """Host-side schedule of the probabilities with which each optimizer step's route is drawn."""

    def __init__(
        self,
        base: Sequence[float],
        *,
        schedule: str = "fixed",
        end: Sequence[float] | None = None,
        curriculum_steps: int = 0,
        ema_decay: float = 0.9,
        temperature: float = 1.0,
        floor: float = 0.2,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown route weight schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        if not temperature > 0.0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.schedule = schedule
        self.base = normalized_weights(base)
        self.end = None
        self.curriculum_steps = curriculum_steps
        if schedule == "curriculum":
            if end is None or len(end) != len(self.base):
                raise ValueError(f"curriculum end weights must have {len(self.base)} entries, got {end}")
            if curriculum_steps < 1:
                raise ValueError(f"curriculum_steps must be >= 1, got {curriculum_steps}")
            self.end = normalized_weights(end)
        self.ema_decay = ema_decay
        self.temperature = temperature
        self.floor = floor
        self._ema: list[float | None] = [None] * len(self.base)
        self._pending = None

    @property
    def adaptive(self) -> bool:
        """Whether the weights depend on observed losses (and ``observe`` reads them back)."""
        return self.schedule == "adaptive"

    def weights(self, step: int) -> np.ndarray:
        """Float64 probabilities (sum 1) for drawing the route of optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.schedule == "curriculum":
            a = min(step / self.curriculum_steps, 1.0)
            return (1.0 - a) * self.base + a * self.end
        if self.schedule == "adaptive":
            return self._adaptive_weights()
        return self.base.copy()

    def _adaptive_weights(self) -> np.ndarray:
        seen = [ema for ema in self._ema if ema is not None]
        if not seen:
            return self.base.copy()
        fill = sum(ema / len(seen) for ema in seen)
        scores = np.maximum([fill if ema is None else ema for ema in self._ema], 0.0)
        # normalise(b s^(1/T)) in log space, so large scores or small T cannot overflow
        with np.errstate(divide="ignore"):
            logits = np.log(self.base) + np.log(scores) / self.temperature
        if not np.isfinite(logits.max()):
            return self.base.copy()
        tilted = np.exp(logits - logits.max())
        return self.floor * self.base + (1.0 - self.floor) * (tilted / tilted.sum())

    def observe(self, route: int, loss) -> None:
        """Record the loss (a jax scalar or float) of the step just dispatched with route ``route``."""
        if not self.adaptive:
            return
        if not 0 <= route < len(self.base):
            raise ValueError(f"route must be in [0, {len(self.base)}), got {route}")
        if self._pending is not None:
            self._fold(*self._pending)
        self._pending = (int(route), loss)

    def _fold(self, route: int, loss) -> None:
        loss = float(loss)
        if not math.isfinite(loss):
            return
        ema = self._ema[route]
        self._ema[route] = loss if ema is None else self.ema_decay * ema + (1.0 - self.ema_decay) * loss

    def get_state(self) -> dict:
        """The running losses and the pending observation, JSON-serialisable."""
        pending = None if self._pending is None else [self._pending[0], float(self._pending[1])]
        return {"ema": list(self._ema), "pending": pending}

    def set_state(self, state) -> None:
        """Restore ``get_state()`` output (possibly after a JSON round trip)."""
        ema, pending = state["ema"], state["pending"]
        if len(ema) != len(self.base):
            raise ValueError(f"route weight state has {len(ema)} routes, expected {len(self.base)}")
        if pending is not None and (len(pending) != 2 or not 0 <= pending[0] < len(self.base)):
            raise ValueError(f"route weight state has a bad pending observation {pending}")
        self._ema = [None if value is None else float(value) for value in ema]
        self._pending = None if pending is None else (int(pending[0]), float(pending[1]))
