"""Pipeline building blocks: plain typed functions, with thin Prefect task wrappers where they run in flows."""

import os

# OpenMP threads (torch, scikit-learn) that reach a barrier early sleep instead of spinning. Beside another job with
# spinning threads at the same priority (a second run, a test suite), SimCLR training on two threads took 7.5-31 s
# spinning against 2.9 s sleeping (2,000 images, one epoch); on an idle machine sleeping costs ~4 % (1.63 vs 1.56 s)
# and beside a low-priority busy loop up to 40 % (bench/omp_wait.py, bench/RESULTS.md). Set before torch loads its
# OpenMP runtime, which happens only through this package; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
