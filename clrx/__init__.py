"""clrx: Leslie Smith's learning-rate methodology for timm models, tracked in MLflow."""

from clrx.range_test.curve import Curve
from clrx.range_test.run import lr_range_test
from clrx.range_test.suggest import Suggestion, suggest
from clrx.schedules.policies import Cyclic, Decay, Exp, Fixed, Hyper, LRRange, OneCycle, Policy, Stages
from clrx.schedules.scheduler import PolicyScheduler

__all__ = [
    "Curve",
    "Cyclic",
    "Decay",
    "Exp",
    "Fixed",
    "Hyper",
    "LRRange",
    "OneCycle",
    "Policy",
    "PolicyScheduler",
    "Stages",
    "Suggestion",
    "lr_range_test",
    "suggest",
]
__version__ = "0.1.0"
