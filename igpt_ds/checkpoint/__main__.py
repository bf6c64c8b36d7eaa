"""`python -m igpt_ds.checkpoint RUN_OR_CHECKPOINT OUT_DIR`: a run's weights as a consolidated fp32 folder
(igpt_ds.checkpoint.export)."""

import sys

from igpt_ds.checkpoint.export import main

if __name__ == "__main__":
    sys.exit(main())
