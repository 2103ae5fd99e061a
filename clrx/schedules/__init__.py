"""Learning-rate and momentum schedules: the papers' policies as pure functions of the optimizer step
(policies), writing their values into an optimizer's param groups (apply), and any policy as a torch
LR scheduler for loops of one's own (scheduler). Reading a range-test curve is not a schedule's job."""
