"""Per-device tuning: override rules from YAML and users' false-positive marks.

Rules are resolved once per device (when it is first seen, and again after a
reload), so a home without overrides pays nothing per message. Marks come
from users publishing `false_positive` on `<prefix>/_feedback/<device>`; each
raises that device's fused-score threshold a step and is kept in a small JSON
file, so a restart does not forget them.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import FeedbackSettings, MuteWindow, Override
from sidecar.topics import filter_matches

__all__ = [
    "FALSE_POSITIVE",
    "NO_RULES",
    "RESET",
    "DeviceRules",
    "FeedbackStore",
    "OverrideTable",
]

_LOG = logging.getLogger(__name__)

# What a user publishes on the feedback topic to mark the last alarm wrong,
# and to take back every mark of a device.
FALSE_POSITIVE = b"false_positive"
RESET = b"reset"
# Where per-user state lives when the config names no file (XDG base
# directory specification: $XDG_STATE_HOME, default ~/.local/state).
STATE_DIR_NAME = "anomaly-sidecar"
FEEDBACK_FILE_NAME = "feedback.json"


@dataclass(frozen=True, slots=True)
class DeviceRules:
    """What the override rules say about one device; None = the global value."""

    ignore: bool = False
    mute: bool = False
    mute_windows: tuple[MuteWindow, ...] = ()
    rf_threshold: float | None = None
    cnn_threshold: float | None = None
    fused_threshold: float | None = None
    alarm_after: int | None = None
    clear_after: int | None = None

    @property
    def changes_thresholds(self) -> bool:
        """Whether any model threshold differs from the global one."""
        return not (
            self.rf_threshold is None
            and self.cnn_threshold is None
            and self.fused_threshold is None
        )

    def muted(self, at: float) -> bool:
        """Return whether verdicts at `at` (unix seconds) are held back.

        Mute windows are in the host's local time, as a person sets them.
        """
        if self.mute:
            return True
        if not self.mute_windows:
            return False
        moment = dt.datetime.fromtimestamp(at).time()
        return any(window.covers(moment) for window in self.mute_windows)


NO_RULES = DeviceRules()


class OverrideTable:
    """The configured override rules, applied in order, later ones winning.

    >>> from sidecar.config import Override
    >>> table = OverrideTable([
    ...     Override(device="garage_*", alarm_after=10),
    ...     Override(topic="zigbee2mqtt/#", device="garage_door", ignore=True),
    ... ])
    >>> table.resolve("garage_light", "zigbee2mqtt/garage_light").alarm_after
    10
    >>> table.resolve("garage_door", "zigbee2mqtt/garage_door").ignore
    True
    >>> table.resolve("kitchen", "zigbee2mqtt/kitchen") is NO_RULES
    True
    """

    def __init__(self, overrides: Sequence[Override]) -> None:
        self._overrides = list(overrides)

    def __bool__(self) -> bool:
        return bool(self._overrides)

    def resolve(self, device: str, topic: str) -> DeviceRules:
        """Merge every rule that selects this device, in order."""
        merged: dict[str, object] = {}
        for rule in self._overrides:
            if rule.device is not None and not fnmatch.fnmatchcase(device, rule.device):
                continue
            if rule.topic is not None and not filter_matches(rule.topic, topic):
                continue
            for name, value in rule.model_dump(exclude={"device", "topic"}).items():
                if value is not None:
                    merged[name] = value
        if not merged:
            return NO_RULES
        if "mute_windows" in merged:
            merged["mute_windows"] = tuple(
                MuteWindow.model_validate(item)
                for item in merged["mute_windows"]  # type: ignore[attr-defined]
            )
        return DeviceRules(**merged)  # type: ignore[arg-type]


class FeedbackStore:
    """Users' false-positive marks per device, kept in a JSON file.

    Args:
        settings: The step per mark, the cap and where the file is.
    """

    def __init__(self, settings: FeedbackSettings) -> None:
        self.settings = settings
        self.path = settings.state_file or default_state_file()
        self._marks: dict[str, int] = {}
        self._load()

    def marks(self, device: str) -> int:
        """How many times a device was marked as a false positive."""
        return self._marks.get(device, 0)

    def raise_threshold(self, device: str, base: float) -> float:
        """The fused threshold a device's marks lift `base` to."""
        marks = self._marks.get(device, 0)
        if not marks:
            return base
        return min(self.settings.max_threshold, base + self.settings.step * marks)

    def mark(self, device: str) -> int:
        """Record one mark and save; return the device's marks now."""
        self._marks[device] = self._marks.get(device, 0) + 1
        self._save()
        return self._marks[device]

    def reset(self, device: str) -> int:
        """Forget a device's marks and save; return how many there were."""
        marks = self._marks.pop(device, 0)
        if marks:
            self._save()
        return marks

    def _load(self) -> None:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            _LOG.warning(
                "feedback file unreadable path=%s error=%r; starting without marks",
                self.path,
                str(err),
            )
            return
        marks = document.get("false_positive", {}) if isinstance(document, dict) else {}
        self._marks = {
            str(device): int(count)
            for device, count in marks.items()
            if isinstance(count, int) and count > 0
        }
        _LOG.info("feedback loaded path=%s devices=%d", self.path, len(self._marks))

    def _save(self) -> None:
        document = {"false_positive": self._marks}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash never leaves half a file behind.
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, delete=False, encoding="utf-8"
            ) as handle:
                json.dump(document, handle, indent=1, sort_keys=True)
            Path(handle.name).replace(self.path)
        except OSError as err:
            _LOG.error(
                "feedback not saved path=%s error=%r; kept until restart",
                self.path,
                str(err),
            )


def default_state_file() -> Path:
    """The feedback file in the user's state folder (XDG base directories)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / STATE_DIR_NAME / FEEDBACK_FILE_NAME
