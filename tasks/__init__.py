"""Pipeline building blocks: plain typed functions, with thin Prefect task wrappers where they run in flows."""

import os

# OpenMP threads (torch, scikit-learn) that reach a barrier early sleep instead of spinning. With spinning (the
# default), one other busy process on a 2-core machine made SimCLR training 10x slower (2,000 images, one epoch,
# two threads: 27-31 s against 2.7 s passive, 2.5 s on one thread). Set before torch loads its OpenMP runtime,
# which happens only through this package; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
