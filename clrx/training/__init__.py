"""Training: one command's run (run), the loops it takes (loop), automatic bounds (auto), the
session it is built from (session), the per-step record (recorder), checkpoints and the batch-size
search. Data flows one way: run -> auto -> loop -> session/recorder -> tracking."""
