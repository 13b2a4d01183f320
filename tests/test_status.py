"""The Status report's text: errors until the next success, cancels apart, workers starting, the comm line."""

from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report


class StartingGroup:
    """A runtime whose ranks are still starting (what the registry holds during ``start``)."""

    def __init__(self, spec):
        self.spec = spec

    def ranks_ready(self):
        return 1, self.spec.world_size


def _spec(tmp_path, **parallel):
    model = tmp_path / "wan.safetensors"
    model.write_bytes(b"0")
    return RuntimeSpec(str(model), ParallelConfig(world_size=2, **parallel), device="cpu")


def test_last_error_shows_until_the_next_success_and_a_cancel_is_not_an_error():
    activity = RunActivity()
    activity.begin(3)
    activity.finish(RuntimeError("rank 1 exited with signal 9"))
    failed = format_report(status_report(activity=activity))
    assert "❌ Last error at " in failed and "rank 1 exited" in failed

    activity.begin(3)
    activity.cancel()
    cancelled = format_report(status_report(activity=activity))
    assert "cancelled by the user at" in cancelled
    assert "rank 1 exited" in cancelled  # a cancel neither is an error nor clears the earlier one

    activity.begin(3)
    activity.finish()
    done = format_report(status_report(activity=activity))
    assert "Last error" not in done and "cancelled" not in done


def test_starting_workers_are_counted(tmp_path):
    report = status_report(activity=RunActivity(), starting=StartingGroup(_spec(tmp_path)), spec=_spec(tmp_path))
    assert report["runtime"]["state"] == "starting workers: 1 of 2 ready"
    assert "📦 Runtime: starting workers: 1 of 2 ready" in format_report(report)


def test_official_warning_only_when_the_official_backend_is_asked_for(tmp_path):
    missing = {"available": False, "version": None, "error": "No module named 'distrifuser'", "install": []}
    report = status_report(activity=RunActivity(), spec=_spec(tmp_path))
    auto = format_report({**report, "official": missing})
    assert "not available" not in auto and "pip install" not in auto
    assert "official package optional, see README" in auto
    asked = format_report({**report, "official": missing, "comm_backend_setting": "official"})
    assert "⚠️ Official DistriFusion not available: No module named 'distrifuser'" in asked
    assert "Install with: pip install -r requirements_official_distrifusion.txt" in asked


class ReadyRuntime:
    """A started runtime: its status names the attention kernel and the compile state the ranks resolved."""

    def __init__(self, spec, **kernels):
        self.spec = spec
        self.kernels = kernels

    def status(self):
        return dict(self.kernels)


def test_compile_and_attention_as_set_then_as_the_ranks_resolved_them(tmp_path):
    spec = _spec(tmp_path, compile_blocks=True)
    before = status_report(activity=RunActivity(), spec=spec)
    assert before["runtime"]["compile"].startswith("on where a CUDA GPU has Triton")
    assert "attention auto, compile on where" in format_report(before)

    ran = ReadyRuntime(spec, attention="sdpa", compile="off (runs eager on cpu: compile needs a CUDA GPU with Triton)")
    text = format_report(status_report(ran, RunActivity(), spec))
    assert "attention auto → sdpa, compile off (runs eager on cpu" in text

    eager = status_report(activity=RunActivity(), spec=_spec(tmp_path, compile_blocks=False))
    assert eager["runtime"]["compile"] == "off"
