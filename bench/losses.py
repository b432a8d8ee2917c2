"""Losses: one entry per loss, per ensemble member, written once for NumPy and torch (`xp`).

  value(y, d, logits, xp) -> (E,)   the loss of outputs y (E, B, n_out) against targets d (E | 1, B, n_out);
                                    cross-entropy reads the logits z^L instead of the softmax outputs
  dvalue(y, d) -> (E, B, n_out)     dLoss/dy for the NumPy backward; the torch twin differentiates value
  fused_output                      the output non-linearity whose Jacobian dvalue already includes
                                    (softmax + cross-entropy: the Jacobians cancel to (p - d) / B)

sse_half is the 1986 paper's E = 1/2 sum over cases and outputs (a sum, not a mean); mse is the mean
over cases and outputs; cross_entropy is the mean over cases of -log softmax(z^L)_target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    name: str
    value: Callable
    dvalue: Callable
    fused_output: str | None = None


def _log_softmax(z, xp):
    shifted = z - xp.amax(z, -1, keepdims=True)  # shift by the max: exp never overflows
    return shifted - xp.log(xp.exp(shifted).sum(-1, keepdims=True))


LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sse_half", lambda y, d, logits, xp: 0.5 * ((y - d) ** 2).sum((1, 2)), lambda y, d: y - d),
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
