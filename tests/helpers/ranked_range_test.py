"""One rank of a multi-process range test (run by torchrun); writes what this rank decided.

ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/helpers/ranked_range_test.py OUT_DIR
"""

import json
import sys
from pathlib import Path

from clrx.config.build import build_policy
from clrx.config.schema import compose_run
from clrx.tracking.store import Silent
from clrx.training.loop import find_range
from clrx.training.session import prepare


def main(out: Path) -> None:
    cfg = compose_run(
        "policy=range_test", "policy.num_iter=80", "policy.max_lr=30", "trainer.batch_size=32", "trainer.device=cpu"
    )
    session = prepare(cfg)
    policy = build_policy(cfg.policy, session.steps_per_epoch, session.total_steps)
    # No MLflow run: this test is about what each rank decides.
    result = find_range(session, policy, Silent(), out / f"rank{session.accelerator.process_index}", "policy")
    decided = {
        "steps": result.steps,
        "world": session.accelerator.num_processes,
        "suggestions": {rule: [s.base_lr, s.max_lr] for rule, s in result.suggestions.items()},
    }
    (out / f"rank{session.accelerator.process_index}.json").write_text(json.dumps(decided))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
