"""A small built-in simulation of smart-home devices with injected faults.

Used by the demo when the real datasets are not available. Each device
publishes in its own ecosystem's format (payloads.md), first normally, then
with one named fault; every message carries its ground truth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np

from converters.ton_iot import LabeledMessage
from sidecar.stream import Message

__all__ = ["simulate"]

# Seconds between simulated reports: zigbee2mqtt sensors report about once a
# minute on change; the replay itself runs faster than real time.
REPORT_PERIOD_S = 60.0
NORMAL_MESSAGES = 300
FAULT_MESSAGES = 120
START_TIME = 1_700_000_000.0


def _fridge(rng: np.random.Generator, i: int, fault: bool) -> bytes:
    temperature = 4.0 + 0.6 * math.sin(i / 15.0) + rng.normal(0.0, 0.1)
    if fault:
        temperature += 6.0 + 0.05 * (i % FAULT_MESSAGES)  # door left open: warming
    document = {
        "temperature": round(temperature, 2),
        "humidity": round(60 + rng.normal(0, 1.5), 1),
        "battery": 87,
        "linkquality": int(rng.integers(100, 140)),
    }
    return json.dumps(document).encode()


def _plug(rng: np.random.Generator, i: int, fault: bool) -> bytes:
    power = 48 + rng.normal(0, 2.5)
    if fault:
        power = 48.0  # meter frozen while the plug keeps reporting
    document = {
        "ENERGY": {"Power": round(power, 1), "Voltage": int(231 + rng.normal(0, 1))}
    }
    return json.dumps(document).encode()


def _thermometer(rng: np.random.Generator, i: int, fault: bool) -> bytes:
    value = 21.0 + 0.8 * math.sin(i / 25.0) + rng.normal(0.0, 0.15)
    if fault and i % 3 == 0:
        return b"nan"  # ESPHome's failed-read marker
    if fault:
        value += rng.choice([-15.0, 25.0])  # erratic sensor
    return f"{value:.2f}".encode()


def _door(rng: np.random.Generator, i: int, fault: bool) -> bytes:
    is_open = (i % 40) < 4
    if fault:
        is_open = bool(rng.integers(0, 2))  # chattering contact
    return json.dumps({"contact": not is_open, "battery": 91}).encode()


_Device = Callable[[np.random.Generator, int, bool], bytes]
_DEVICES: dict[str, tuple[str, str, _Device]] = {
    "kitchen_fridge": ("zigbee2mqtt/kitchen_fridge", "warming", _fridge),
    "washer_plug": ("tele/washer_plug/SENSOR", "frozen_value", _plug),
    "esp_living": ("esp_living/sensor/living_temp/state", "erratic", _thermometer),
    "front_door": ("zigbee2mqtt/front_door", "chattering", _door),
}


def simulate(seed: int = 0) -> dict[str, list[LabeledMessage]]:
    """Return per-device labeled streams: normal traffic, then one fault each."""
    rng = np.random.default_rng(seed)
    streams: dict[str, list[LabeledMessage]] = {}
    for device, (topic, fault_name, make) in _DEVICES.items():
        stream = []
        for i in range(NORMAL_MESSAGES + FAULT_MESSAGES):
            fault = i >= NORMAL_MESSAGES
            message = Message(
                topic, make(rng, i, fault), START_TIME + i * REPORT_PERIOD_S
            )
            stream.append(
                LabeledMessage(
                    device, message, int(fault), fault_name if fault else "normal"
                )
            )
        streams[device] = stream
    return streams
