"""``python -m clrx ARGS``, SIGKILLed by itself just before optimizer step STEP: a crash at a known point.

python tests/helpers/killed_at_step.py STEP ARGS...
"""

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_pre_hook

from clrx.__main__ import main


def kill_before(stop: int) -> None:
    taken = 0

    def count(optimizer, args, kwargs):
        nonlocal taken
        if taken == stop:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as with a lost node
        taken += 1

    register_optimizer_step_pre_hook(count)


if __name__ == "__main__":
    kill_before(int(sys.argv[1]))
    sys.argv = ["clrx", *sys.argv[2:]]
    main()
