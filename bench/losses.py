"""Losses: one entry per loss, per ensemble member, written once for NumPy and torch (`xp`).

  value(y, d, logits, xp) -> (E,)   the loss of outputs y (E, B, n_out) against targets d (E | 1, B, n_out);
                                    cross-entropy reads the logits z^L instead of the softmax outputs
  dvalue(y, d) -> (E, B, n_out)     dLoss/dy for the NumPy backward; the torch twin differentiates value
  fused_output                      the output non-linearity whose Jacobian dvalue already includes
                                    (softmax + cross-entropy: the Jacobians cancel to (p - d) / B)

sse_half is the 1986 paper's E = 1/2 sum over cases and outputs (a sum, not a mean); sse_half_deadzone
is sse_half without the outputs already right (1986 family trees: an output that should be on and is
above 1 - 0.2, or should be off and is below 0.2, counts as no error and gets no gradient); mse is the
mean over cases and outputs; cross_entropy is the mean over cases of -log softmax(z^L)_target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEADZONE_BAND = 0.2  # sse_half_deadzone: outputs within 0.2 of their 0/1 target count as right (1986)


@dataclass(frozen=True)
class Loss:
    name: str
    value: Callable
    dvalue: Callable
    fused_output: str | None = None


def _log_softmax(z, xp):
    shifted = z - xp.amax(z, -1, keepdims=True)  # shift by the max: exp never overflows
    return shifted - xp.log(xp.exp(shifted).sum(-1, keepdims=True))


def in_deadzone(y, d, xp=np):
    """Outputs that count as no error in sse_half_deadzone: target 1 (on) and y > 1 - band, or
    target 0 (off) and y < band (1986). Targets above 1/2 count as "on"; the test is one-sided, so an
    identity output past its target is inside too. The loss jumps by band^2 / 2 at the band's edge."""
    return xp.where(d > 0.5, y > d - DEADZONE_BAND, y < d + DEADZONE_BAND)


def _deadzone_error(y, d, xp):
    """y - d, with 0 for outputs inside their band: no error, so no gradient either."""
    return xp.where(in_deadzone(y, d, xp), 0.0, y - d)


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sse_half", lambda y, d, logits, xp: 0.5 * ((y - d) ** 2).sum((1, 2)), lambda y, d: y - d),
    Loss("sse_half_deadzone", lambda y, d, logits, xp: 0.5 * (_deadzone_error(y, d, xp) ** 2).sum((1, 2)),
         lambda y, d: _deadzone_error(y, d, np)),
    Loss("mse", lambda y, d, logits, xp: ((y - d) ** 2).mean((1, 2)),
         lambda y, d: (2.0 / (y.shape[1] * y.shape[2])) * (y - d)),
    Loss("cross_entropy", lambda y, d, logits, xp: -(d * _log_softmax(logits, xp)).sum(2).mean(1),
         lambda y, d: (y - d) / y.shape[1], fused_output="softmax"),
)}


def get(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"train.loss={name!r}; valid choices: {', '.join(LOSSES)}") from None
