"""Entry point of one worker process, started by file path: ``python <repo>/distrifusion/worker_main.py``.

A child of ComfyUI cannot import the pack by its (hyphenated) folder name, so this script loads
``bootstrap.py`` by path, registers the repo root under a fixed alias and runs
``<alias>.distrifusion.worker.main``. Never imported as a module.
"""

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path


def _bootstrap():
    path = Path(__file__).resolve().with_name("bootstrap.py")
    spec = importlib.util.spec_from_file_location("_wan_distrifusion_bootstrap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    bootstrap = _bootstrap()
    bootstrap.drop_script_dir(__file__)
    package = bootstrap.register_package()
    worker = importlib.import_module(f"{package.__name__}.distrifusion.worker")
    code = worker.main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch and its threads; nothing is left to clean
