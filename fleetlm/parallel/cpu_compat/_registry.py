"""Bookkeeping for the CPU replacements: which Paddle attribute was replaced, and its original."""

from typing import Any

_originals: dict[str, Any] = {}


def replace(owner: Any, attribute: str, replacement: Any, name: str) -> None:
    """Set ``owner.attribute`` to ``replacement`` and keep the first original under ``name``."""
    if name not in _originals:
        _originals[name] = getattr(owner, attribute)
    setattr(owner, attribute, replacement)


def original(name: str) -> Any:
    """Return Paddle's own object that ``name`` was replaced with; raise KeyError if it was not replaced."""
    if name not in _originals:
        raise KeyError(f"{name!r} has not been replaced; replaced so far: {sorted(_originals)}")
    return _originals[name]
