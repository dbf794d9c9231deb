"""Real-time anomaly detection sidecar for MQTT IoT networks."""

from __future__ import annotations

from sidecar.config import Settings, load_settings
from sidecar.detector import Cascade, Threshold, load_cascade
from sidecar.errors import ConfigError, ModelLoadError, SidecarError
from sidecar.features import DeviceState, FeatureSpec
from sidecar.payload import parse_payload
from sidecar.pipeline import Pipeline
from sidecar.stream import Message
from sidecar.verdicts import AlarmLifecycle, Verdict

__all__ = [
    "AlarmLifecycle",
    "Cascade",
    "ConfigError",
    "DeviceState",
    "FeatureSpec",
    "Message",
    "ModelLoadError",
    "Pipeline",
    "Settings",
    "SidecarError",
    "Threshold",
    "Verdict",
    "load_cascade",
    "load_settings",
    "parse_payload",
]
