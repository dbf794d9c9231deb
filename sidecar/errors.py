"""The sidecar's exceptions: one base error and a child per failure kind."""

from __future__ import annotations

__all__ = ["ConfigError", "ModelLoadError", "SidecarError"]


class SidecarError(Exception):
    """Base class of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """A configuration file could not be read or did not validate.

    Attributes:
        source: The file (or other origin) the configuration came from.
        problems: One line per problem, each naming the key path, the value
            received and what is allowed.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        message = f"invalid configuration in {source}:\n{lines}"
        super().__init__(message)


class ModelLoadError(SidecarError):
    """A shipped model or its model card could not be loaded or does not fit.

    Attributes:
        path: The model or card file that failed.
        reason: What was wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        message = f"cannot load model {path}: {reason}"
        super().__init__(message)
