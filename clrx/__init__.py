"""clrx: Leslie Smith's learning-rate methodology for timm models, tracked in MLflow.

The public names are imported on first use, so that ``python -m clrx --help`` starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Curve": "clrx.range_test.curve",
    "lr_range_test": "clrx.range_test.run",
    "Suggestion": "clrx.range_test.suggest",
    "suggest": "clrx.range_test.suggest",
    "PolicyScheduler": "clrx.schedules.scheduler",
    **dict.fromkeys(
        ("Cosine", "Cyclic", "Decay", "Exp", "Fixed", "Hyper", "LRRange", "OneCycle", "Policy", "Stages"),
        "clrx.schedules.policies",
    ),
}
__all__ = sorted(_HOMES, key=str.lower)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'clrx' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
