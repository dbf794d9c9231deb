"""The Docker files, checked without an engine: what they name exists and loads.

No Docker engine (and no `docker compose`) runs where these tests run; the
Dockerfile is linted with hadolint in `make lint`, and these tests check what
a linter cannot: that the compose file's mounts and the image's config point
at real files and that the config they mount is valid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return document


def test_compose_runs_the_sidecar_beside_official_mosquitto() -> None:
    """Test the two services, the build context and the start order."""
    services = _compose()["services"]

    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["sidecar"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / services["sidecar"]["build"]["context"]).resolve() == ROOT
    assert "mosquitto" in services["sidecar"]["depends_on"]


def test_compose_bind_mounts_point_at_files_in_the_repository() -> None:
    """Test that every host path the compose file mounts exists."""
    named = set(_compose().get("volumes", {}))
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source in named:
                continue
            assert (DOCKER / source).exists(), f"{source} mounted but missing"


def test_config_mounted_into_the_image_is_valid_and_reaches_the_broker() -> None:
    """Test that configs/docker.yaml loads and names the compose broker."""
    settings = load_settings(ROOT / "configs" / "docker.yaml")

    assert settings.broker.host == "mosquitto"
    assert settings.models.directory == Path("/app/models")
    assert settings.feedback.state_file == Path("/app/state/feedback.json")


def test_dockerfile_copies_only_what_exists_and_runs_as_non_root() -> None:
    """Test the image's COPY sources exist and its user is numeric, not root."""
    text = (DOCKER / "Dockerfile").read_text()
    sources = [
        part
        for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE)
        for part in line.split()[:-1]
    ]

    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing"
    user = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert user == ["10001"]
