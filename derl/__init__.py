"""derl: decoupled entity representation learning for ads ranking, on TorchRec.

The code lives in the repository's top-level folders, installed as subpackages of this one:
`derl.datapipes`, `derl.models`, `derl.launchers`, `derl.benchmarks`.
"""

import os

# OpenMP threads that busy-wait between parallel regions starve everything else on a shared CPU,
# which made contended 1-rank runs many times slower (docs/results.md, "Benchmarks"). Set before
# torch loads (every derl module imports this package first); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
