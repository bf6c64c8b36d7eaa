"""A stand-in entry point for tests/test_supervisor.py: runs `work` under igpt_ds.distributed.supervisor.supervised.

    python tests/supervised_program.py OUT_DIR EXIT_CODE

The worker notes its pid in OUT_DIR/worker.pid, then waits for SIGTERM (noting it in OUT_DIR/got_sigterm),
prints a line after it (to a console that may be gone), and returns EXIT_CODE."""

import signal
import sys
import time
from pathlib import Path

from igpt_ds.distributed.supervisor import supervised


def work() -> int:
    out, code = Path(sys.argv[1]), int(sys.argv[2])
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    (out / "worker.pid").write_text(str(__import__("os").getpid()))
    while not got:
        time.sleep(0.05)
    (out / "got_sigterm").write_text("yes")
    time.sleep(0.5)  # "saving"
    print("saved; exiting", flush=True)  # the console may be a closed pipe by now
    (out / "done").write_text("yes")
    return code


if __name__ == "__main__":
    sys.exit(supervised(work))
