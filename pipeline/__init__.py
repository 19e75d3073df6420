"""The DVC stage scripts, one per stage: `python -m pipeline.<stage> [variant]`."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m pipeline.<stage>` is starting (argv[0] while it loads)
    from pipeline.common import stop_on_signals

    stop_on_signals()  # before torch loads: Ctrl-C at any point is one line and exit 130
