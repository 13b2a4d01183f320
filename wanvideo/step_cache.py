"""Step caching: ComfyUI's EasyCache (``comfy_extras/nodes_easycache.py``) around one model call per sampler step.

EasyCache skips a model call when the output is predicted to barely change. Per call in its sigma range it
measures the input change ``mean|x - x_prev|`` (subsampled 8x over height and width, on one conditioning's batch
item), predicts the relative output change as ``k * input_change / mean|out_prev|`` with ``k`` the last measured
ratio of output change to input change, and accumulates it; while the sum stays under ``reuse_threshold`` the
call is skipped and returns ``x + (out_prev - x_prev)`` (per batch item), otherwise the model runs and the sum
restarts at 0. Two computed calls in range come before the first skip (the first gives ``x_prev``, the second ``k``).

Same widgets and meaning as ComfyUI's node: ``start_percent`` / ``end_percent`` are sampling percents turned into
sigmas by the flow model's shift (``percent_to_sigma``); calls at or below the end sigma run the model and
touch no cache. Faithful details: ComfyUI batches [uncond; cond] and measures the first item (the negative
prompt's; the positive's without CFG) and normalises by the whole batch's mean |output|; image-to-video inputs
are measured with their concatenated channels (``y``), whose last output-width channels ComfyUI subtracts.

``decide`` makes the skip one decision for a group of ranks: it maps this rank's accumulated change to the value
every rank compares (the distributed runtime passes an all-reduce MAX; one process passes nothing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import WanDistriFusionError

logger = logging.getLogger(__name__)

SUBSAMPLE_FACTOR = 8
"""What ComfyUI's EasyCache node fixes: every 8th latent row and column is measured."""
MAX_REUSE_THRESHOLD = 3.0
"""The node's widget maximum."""

Decide = Callable[[Tensor], Tensor]
"""``decide(accumulated_change) -> value every rank compares with the threshold`` (a 0-d tensor)."""


@dataclass(frozen=True)
class EasyCacheSettings:
    """The EasyCache widgets, checked when built (ComfyUI's ranges and defaults)."""

    reuse_threshold: float = 0.2
    start_percent: float = 0.15
    end_percent: float = 0.95
    verbose: bool = False

    def __post_init__(self) -> None:
        threshold = self.reuse_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise WanDistriFusionError(f"reuse_threshold: {threshold!r} is not a number; use e.g. 0.2.")
        if not 0.0 <= threshold <= MAX_REUSE_THRESHOLD:
            raise WanDistriFusionError(
                f"reuse_threshold: {threshold:g} is outside 0..{MAX_REUSE_THRESHOLD:g}; higher skips more steps "
                "(0.2 is ComfyUI's default)."
            )
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise WanDistriFusionError(f"{name}: {value!r} must be a fraction of the sampling in 0..1.")
        if self.start_percent > self.end_percent:
            raise WanDistriFusionError(
                f"start_percent: {self.start_percent:g} is after end_percent {self.end_percent:g}; make start_percent "
                "the smaller (ComfyUI's defaults: 0.15 and 0.95)."
            )

    @classmethod
    def parse(cls, text: str, verbose: bool = False) -> EasyCacheSettings:
        """``THRESHOLD[,START,END]`` (the CLI's ``--easycache``)."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) not in (1, 3):
            raise WanDistriFusionError(
                f"--easycache: {text!r} is not THRESHOLD or THRESHOLD,START,END; use e.g. 0.2 or 0.2,0.15,0.95."
            )
        try:
            numbers = [float(part) for part in parts]
        except ValueError as error:
            raise WanDistriFusionError(
                f"--easycache: {text!r} has a part that is not a number; use e.g. 0.2."
            ) from error
        if len(numbers) == 1:
            return cls(numbers[0], verbose=verbose)
        return cls(numbers[0], numbers[1], numbers[2], verbose=verbose)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("reuse_threshold", "start_percent", "end_percent", "verbose")}


def percent_to_sigma(percent: float, shift: float) -> float:
    """ComfyUI's ``ModelSamplingDiscreteFlow.percent_to_sigma`` for a model patched by ``ModelSamplingSD3(shift)``."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def skip_summary(skipped: list[int], calls: int) -> str:
    """ComfyUI's closing line (skipped calls of all, the speed-up that means) and which calls were skipped."""
    done = calls - len(skipped)
    speedup = calls / done if done else 1.0
    return f"EasyCache - skipped {len(skipped)}/{calls} steps ({speedup:.2f}x speedup); skipped calls {skipped}"


class EasyCache:
    """One sampling run's EasyCache state (a new one per run, as ComfyUI clones its holder per sample)."""

    def __init__(self, settings: EasyCacheSettings, shift: float, decide: Decide | None = None, log: bool = True):
        self.settings = settings
        self.start_sigma = percent_to_sigma(settings.start_percent, shift)
        self.end_sigma = percent_to_sigma(settings.end_percent, shift)
        self.decide = decide
        self.log = log
        """Whether this rank logs (one rank of a group does)."""
        self.calls = 0
        self.skipped: list[int] = []
        """Indices (from 0) of the calls that were skipped."""
        self.last_skipped = False
        self.notes: list[str] = []
        """The verbose lines of the last call (a worker group's controller logs rank 0's in its own console)."""
        self._active = False
        self._rate: Tensor | None = None
        self._accumulated: Tensor | float = 0.0
        self._x_prev: Tensor | None = None
        self._out_prev: Tensor | None = None
        self._out_prev_norm: Tensor | None = None
        self._diff: Tensor | None = None

    def __call__(self, model_input: Tensor, sigma: float, run: Callable[[], Tensor], measured_item: int, items: int):
        """The model output for this call: ``run()``, or the cached estimate when the call is skipped.

        ``model_input`` is what the model sees ``[items * B, C (+ concatenated), F, H, W]``; ``measured_item`` is
        the batch item ComfyUI measures (of ``items`` conditionings).
        """
        index, self.calls, self.last_skipped, self.notes = self.calls, self.calls + 1, False, []
        sigma32 = torch.tensor(sigma, dtype=torch.float32)
        if not bool(sigma32 > self.end_sigma):
            return run()  # past the end: ComfyUI runs the model and touches no cache
        input_change = None
        if bool(sigma32 <= self.start_sigma):
            self._active = True  # ComfyUI's first_cond_uuid, taken at the first call in range
            measured_input = self._subsample(model_input, measured_item, items)
            if self._x_prev is not None:
                input_change = (measured_input - self._x_prev).flatten().abs().mean()
            if self._out_prev_norm is not None and self._rate is not None:
                self._accumulated = self._accumulated + (self._rate * input_change) / self._out_prev_norm
                agreed = self._agree(self._accumulated)
                self._accumulated = agreed
                if bool(agreed < self.settings.reuse_threshold):
                    self._verbose("skipping step; cumulative_change_rate: %s, reuse_threshold: %s", agreed)
                    self.skipped.append(index)
                    self.last_skipped = True
                    return self._aligned(model_input, self._diff) + self._diff
                self._verbose("NOT skipping step; cumulative_change_rate: %s, reuse_threshold: %s", agreed)
                self._accumulated = 0.0
        output = run()
        if self._active and self._out_prev_norm is not None:
            output_change = (self._subsample(output, measured_item, items) - self._out_prev).flatten().abs().mean()
            if input_change is not None:
                self._rate = output_change / input_change
        self._diff = output - self._aligned(model_input, output)
        if self._active:
            self._x_prev = self._subsample(model_input, measured_item, items).clone()
            self._out_prev = self._subsample(output, measured_item, items).clone()
            self._out_prev_norm = output.flatten().abs().mean()
        return output

    def _agree(self, accumulated: Tensor) -> Tensor:
        if self.decide is None:
            return accumulated
        value = torch.nan_to_num(accumulated.detach().float(), nan=math.inf)  # NaN never skips, as in ComfyUI
        return self.decide(value).to(value.device, value.dtype)

    def _verbose(self, message: str, value) -> None:
        if self.settings.verbose and self.log:
            self.notes.append("EasyCache [verbose] - " + message % (float(value), self.settings.reuse_threshold))
            logger.info(self.notes[-1])

    @staticmethod
    def _subsample(x: Tensor, item: int, items: int) -> Tensor:
        per_item = x.shape[0] // items
        return x[item * per_item : (item + 1) * per_item, ..., ::SUBSAMPLE_FACTOR, ::SUBSAMPLE_FACTOR]

    @staticmethod
    def _aligned(model_input: Tensor, output: Tensor) -> Tensor:
        """``model_input`` cut to ``output``'s shape as ComfyUI cuts it (the last entries of a longer dimension:
        image-to-video's concatenated channels end the input)."""
        if model_input.shape[1:] == output.shape[1:]:
            return model_input
        index = [slice(None)] + [
            slice(size_in - size_out, None) if size_in != size_out else slice(None)
            for size_in, size_out in zip(model_input.shape[1:], output.shape[1:])
        ]
        return model_input[tuple(index)]
