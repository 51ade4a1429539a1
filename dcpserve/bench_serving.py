"""`python -m dcpserve.bench_serving`: the serving benchmark (implementation in dcpserve/bench/serving.py)."""
from __future__ import annotations

import sys

from dcpserve.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
