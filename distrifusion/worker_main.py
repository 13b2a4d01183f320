"""Entry point of one rank's process, started by file path: ``python <repo>/distrifusion/worker_main.py``.

A child of ComfyUI cannot import the pack by its (hyphenated) folder name: ``bootstrap.py`` (run by path)
registers the repo root under a fixed alias, then ``<alias>.distrifusion.rank_main.main`` runs. Never imported.
"""

import importlib
import logging
import os
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    package = runpy.run_path(str(Path(__file__).resolve().with_name("bootstrap.py")))["entry_point"](__file__)
    code = importlib.import_module(f"{package.__name__}.distrifusion.rank_main").main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch and its threads; nothing is left to clean
