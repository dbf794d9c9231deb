"""The message stream shape shared by the live path, training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message as the sidecar sees it, wherever it came from.

    A dataset loader turns a file into a sequence of these; the MQTT adapter
    turns broker traffic into the same. Nothing downstream knows which.

    Attributes:
        topic: The topic the message was published on.
        payload: The raw payload bytes, undecoded.
        received_at: Receive time in Unix seconds (broker receive time when
            live, the dataset's own time when replayed).
        retain: Whether the broker delivered it as a retained message.
    """

    topic: str
    payload: bytes
    received_at: float
    retain: bool = False
