"""What every kind of destination's sender shares: the failure of one attempt, and what a delivery did."""

from __future__ import annotations

from dataclasses import dataclass

from node.errors import AinodeError


class SendError(AinodeError):
    """A result could not be delivered to a destination (this attempt)."""


@dataclass(frozen=True)
class Delivery:
    status: int  # the last object's status (Success, or a warning 0xBxxx)
    seconds: float
    statuses: tuple[int, ...] = ()  # per object sent, in order
