"""`diffu-lsp` whose model sleeps in every forward pass: a slow model for real-editor tests of what
a long command shows (its progress and drafts) without the CPU work of a big network.

    python tests/slow_diffu_lsp.py SECONDS [diffu-lsp arguments...]

Use it with the setting engine = "local": the sleep is patched into this process only, and a
model daemon is another process.
"""

import sys
import time

from diffu_lsp.cli import main
from diffu_lsp.models.backend import DiffusionModel

SECONDS = float(sys.argv.pop(1))
fast_forward = DiffusionModel.forward


def slow_forward(self, *args, **kwargs):
    time.sleep(SECONDS)
    return fast_forward(self, *args, **kwargs)


DiffusionModel.forward = slow_forward
raise SystemExit(main(sys.argv[1:]))
