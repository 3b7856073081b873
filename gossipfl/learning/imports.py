"""Load a user's function from an import path such as ``mypkg.models:make_model``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gossipfl.errors import DataError


def is_import_path(spec: str) -> bool:
    """True for ``pkg.mod:fn`` specs, which name user code rather than a built-in."""
    return ":" in spec


def load_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return it, turning every failure into a DataError.

    ``what`` names the setting (e.g. ``model``) so the message tells the user which key is wrong.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DataError(f"{what}: {spec!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure in user code is a config problem
        raise DataError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{what}: {spec!r} is not callable")
    return obj
