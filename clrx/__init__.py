"""clrx: Leslie Smith's learning-rate methodology for timm models, tracked in MLflow."""

from clrx.policies import Cyclic, Fixed, Hyper, OneCycle, Policy

__all__ = ["Cyclic", "Fixed", "Hyper", "OneCycle", "Policy"]
__version__ = "0.1.0"
