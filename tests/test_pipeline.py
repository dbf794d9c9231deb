"""Pipeline behaviour on replays and echoes, with the shipped models."""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.service import build_pipeline
from sidecar.stream import Message
from sidecar.topics import TopicRouter


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models, loaded once."""
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


@functools.cache
def _shipped_models() -> LoadedModels:
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


def _reading(index: int) -> bytes:
    return json.dumps({"power": 40 + index % 5}).encode()


def test_pipeline_skips_retained_replays_of_tracked_devices(
    models: LoadedModels,
) -> None:
    """Test that a retained replay after a reconnect is counted, not re-scored."""
    pipeline = build_pipeline(Settings(), models)
    pipeline.process([Message("shellies/plug1/relay/0/power", b"42.5", 1.0, True)])
    pipeline.process([Message("shellies/plug1/relay/0/power", b"42.6", 2.0)])

    pipeline.process([Message("shellies/plug1/relay/0/power", b"42.6", 3.0, True)])

    assert pipeline.counters.retained_replays == 1
    assert pipeline.counters.processed == 3
    assert pipeline.devices_tracked == 1


@pytest.mark.parametrize(
    "topic",
    [
        "anomalies/fridge_plug",
        "site2/anomalies/fridge_plug",
        "site2/anomalies/_scores/fridge_plug",
        "alerts/_status",
        "alerts/_health",
        "alerts/_feedback/fridge_plug",
        "alerts/_scores/fridge_plug",
        "remote/anomalies",
    ],
)
def test_router_treats_bridged_output_as_own(topic: str) -> None:
    """Test that our output republished under a bridge prefix is still ours."""
    router = TopicRouter(Settings().topics, "anomalies")
    assert router.is_own_output(topic)


def test_pipeline_never_tracks_bridged_output(models: LoadedModels) -> None:
    """Test that echoed verdicts under a bridge prefix never become a device."""
    pipeline = build_pipeline(Settings(), models)
    echoes = [
        Message("site2/anomalies/fridge_plug", _reading(i), float(i))
        for i in range(300)
    ]

    pipeline.process(echoes)

    assert pipeline.devices_tracked == 0
    assert pipeline.counters.own_output == 300


def test_verdict_from_tuya_bridge_never_carries_the_local_key() -> None:
    """Test that the verdict JSON masks the key and IP a Tuya topic carries."""
    settings = settings_from_mapping(
        {
            "detection": {
                "rf_threshold": 0.0,
                "cnn_threshold": 0.0,
                "fused_threshold": 0.0,
                "alarm_after": 1,
                "clear_after": 10_000,
            }
        }
    )
    alarming = load_cascade(settings.models, settings.detection, settings.window.length)
    pipeline = build_pipeline(settings, alarming)
    topic = "tuya/bf0123/0f1e2d3c4b5a6978/192.168.1.40/dps"
    messages = [
        Message(topic, json.dumps({"1": i % 2 == 0, "19": 230 + i % 7}).encode(), i)
        for i in range(230)
    ]

    verdicts = pipeline.process(messages).verdicts

    assert verdicts
    document = verdicts[0].to_json().decode()
    assert '"device":"bf0123"' in document
    assert "tuya/bf0123/***/***/dps" in document
    assert "0f1e2d3c4b5a6978" not in document
    assert "192.168.1.40" not in document


class _FiniteInputs:
    """Wraps a scorer and fails the test if a non-finite input reaches it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows = 0

    def score(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        assert np.isfinite(inputs).all(), "non-finite model input"
        self.rows += len(inputs)
        result: npt.NDArray[np.float32] = self.inner.score(inputs)
        return result


_HOSTILE_PAYLOADS = st.one_of(
    st.binary(max_size=512),
    st.sampled_from(
        [b"nan", b"-inf", b"1e999", b'{"t":NaN}', b'{"t":nan}', b"", b"unavailable"]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x).encode()),
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.floats(), st.integers(-(10**30), 10**30), st.text(max_size=8)),
        max_size=6,
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=40, deadline=None, database=None)
@given(tail=st.lists(_HOSTILE_PAYLOADS, min_size=1, max_size=80))
def test_pipeline_hostile_payloads_never_raise_and_models_see_finite_inputs(
    tail: list[bytes],
) -> None:
    """Test random payloads after a warm-up: no exception, only finite inputs."""
    defaults = Settings()
    models = _shipped_models()
    pipeline = build_pipeline(defaults, models)
    rf = _FiniteInputs(pipeline.cascade.rf)
    cnn = _FiniteInputs(pipeline.cascade.cnn)
    warmup = [Message("zigbee2mqtt/fuzz", _reading(i), float(i)) for i in range(140)]
    hostile = [
        Message("zigbee2mqtt/fuzz", payload, 140.0 + i)
        for i, payload in enumerate(tail)
    ]

    pipeline.cascade.rf, pipeline.cascade.cnn = rf, cnn
    try:
        pipeline.process(warmup)
        pipeline.process(hostile)
    finally:
        pipeline.cascade.rf, pipeline.cascade.cnn = rf.inner, cnn.inner

    assert pipeline.counters.processed == 140 + len(tail)
    assert rf.rows >= len(tail)
