"""derl: decoupled entity representation learning for ads ranking, on TorchRec.

The code lives in the repository's top-level folders, installed as subpackages of this one:
`derl.datapipes`, `derl.models`, `derl.launchers`, `derl.benchmarks`.
"""
