"""derl: decoupled entity representation learning for ads ranking, on TorchRec.

The code lives in the repository's top-level folders, installed as subpackages of this one:
`derl.datapipes`, `derl.models`, `derl.launchers`, `derl.benchmarks`.
"""

import os

# OpenMP threads that busy-wait between parallel regions starve everything else on a shared CPU:
# with other processes on the cores, a 1-rank CPU run measured 10-40x slower with the default
# than with passive waiting (benchmarks/results/cpu-2core/bench.md). Set before torch loads
# (every derl module imports this package first); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
