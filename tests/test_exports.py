"""The package's public surface is exactly what `__all__` says."""

from __future__ import annotations

import sidecar


def test_all_names_are_exported_and_sorted() -> None:
    """Test that every name in `sidecar.__all__` exists and the list is sorted."""
    assert sidecar.__all__ == sorted(sidecar.__all__)
    for name in sidecar.__all__:
        assert hasattr(sidecar, name), name


def test_public_attributes_are_listed_in_all() -> None:
    """Test that no public, non-module attribute is missing from `__all__`."""
    public = {
        name
        for name, value in vars(sidecar).items()
        if not name.startswith("_")
        and not isinstance(value, type(sidecar))
        and name != "annotations"
    }
    assert public == set(sidecar.__all__)
