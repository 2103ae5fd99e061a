"""The LR range test: its record and stop rule (curve), its steps (run), the rules that read bounds
off it (suggest) and its figure. Automatic bounds for a training run are ``clrx.training.auto``."""
