"""Thin Ray Job entrypoints: `python -m jobs.ingest`, `python -m jobs.finetune`.

Importing this package puts the project's `platform/` first on sys.path, so a job started from a
copy of the project imports lorag from that copy: `ray job submit --working-dir .` uploads the
project and Ray puts the copy's root on the path, but not `platform/`. The job's workers get the
same path from `lorag.cluster.connect` (or from `lorag submit`'s runtime_env).
"""

import os
import sys

_PLATFORM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
if _PLATFORM not in sys.path:
    sys.path.insert(0, _PLATFORM)
