"""What the fault and load tests measure: processes left below this one, and tables of numbers printed in
pytest's terminal summary (shown without ``-s``).

``table = report_table(request.config, "faults", ["fault", "detected after"])`` in a module fixture, then
``table.append(["SIGKILL rank 0", "0.31 s"])``; ``assert not descendants(keep=...)`` after a fault.
"""

from __future__ import annotations

import psutil

HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Python's own helper processes, which other tests of the session (``parallel_harness``) may have started."""


def descendants(keep: set[int] = frozenset()) -> list[psutil.Process]:
    """Live processes below this one (the controller), except ``keep`` and Python's multiprocessing helpers."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid in keep or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if not any(helper in " ".join(process.cmdline()) for helper in HELPERS):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


class _Table(list):
    def __init__(self, title: str, header: list[str]):
        super().__init__()
        self.title, self.header = title, header

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self:
            return
        terminalreporter.section(self.title)
        terminalreporter.write_line(" | ".join(self.header))
        for row in self:
            terminalreporter.write_line(" | ".join(str(cell) for cell in row))


def report_table(config, title: str, header: list[str]) -> list:
    """A list whose rows are printed under ``title`` at the end of the run."""
    table = _Table(title, header)
    config.pluginmanager.register(table, f"measured-{title}")
    return table
