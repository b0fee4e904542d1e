"""`python -m derl.launchers.runtime.torchrun ...`: torchrun, ending a failed job with derl's line alone.

Same flags as `torchrun` (it runs torchrun's own `run`). A rank that fails has already printed
derl's one line and exit code (`derl.launchers.cli`); plain torchrun then adds its agent's
error log, a `ChildFailedError` traceback and a failure summary of its own. This wrapper leaves
those out and ends with the failing rank's exit code (130 after Ctrl-C). The TorchX components
start their ranks with it; `DERL_VERBOSE=1` keeps torchrun's own report.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.elastic.multiprocessing.errors import _NOT_AVAILABLE
from torch.distributed.run import get_args_parser, run

from derl.launchers.runtime import quiet

# What the agent logs when a rank ends badly (derl's own line has said why).
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")


def main(argv: Optional[List[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    if quiet.verbose():
        run(args)
        return
    for name in AGENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.error_file != _NOT_AVAILABLE:  # the rank's reply, where the launcher reads it
            get_error_handler().dump_error_file(failure.error_file, failure.exitcode)
        code = failure.exitcode
        raise SystemExit(code if code > 0 else 128 - code) from None
    except SignalException as e:
        raise SystemExit(128 + int(e.sigval)) from None
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main(sys.argv[1:])
