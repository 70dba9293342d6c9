"""Quality benchmark: real LoRA adapters on all-MiniLM-L6-v2, merged by every method, scored per task.

See README.md in this directory; run with ``python -m benchmarks.quality``.
"""

import os

# On a shared CPU, OpenMP threads that spin while waiting steal cycles from the busy ones: let them sleep.
# (Read when torch loads, so it only takes effect when this package is imported first, as under ``python -m``.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
