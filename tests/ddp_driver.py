"""One rank of a test job: `fastmsd train` with test-only instrumentation, started by torchrun
or by a test with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

FASTMSD_TEST_DUMP=DIR    after the last step, write this rank's weights, momentum and rings
FASTMSD_TEST_DIE_AT=R:S  rank R dies (no cleanup, like a killed process) in step S + 1
"""

import os
import sys

import torch

from fastmsd import cli
from fastmsd.engine import Engine

RANK = int(os.environ.get("RANK", "0"))
DUMP = os.environ.get("FASTMSD_TEST_DUMP")
DIE_AT = os.environ.get("FASTMSD_TEST_DIE_AT")
_optimizer_step = Engine.optimizer_step


def optimizer_step(self, n):
    if DIE_AT is not None and (RANK, self.step) == tuple(int(x) for x in DIE_AT.split(":")):
        os._exit(17)
    grad_norm = _optimizer_step(self, n)
    if DUMP is not None and self.step == self.cfg.train.steps:
        os.makedirs(DUMP, exist_ok=True)
        torch.save({"student": self.student_flat, "momentum": self.teacher.flat, "tau": self.model.tau.data,
                    "ring_img": self.rings.img, "ring_txt": self.rings.txt, "ptr": self.rings.ptr,
                    "n_valid": self.rings.n_valid}, os.path.join(DUMP, f"rank{RANK}.pt"))
    return grad_norm


Engine.optimizer_step = optimizer_step
if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
