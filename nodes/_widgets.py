"""Compact ComfyUI (V1) input specs: every widget with its range, default and a tooltip."""

from __future__ import annotations


def int_widget(default: int, low: int, high: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip, **extra})


def float_widget(default: float, low: float, high: float, step: float, tooltip: str, **extra) -> tuple:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip, **extra})


def combo_widget(options, default: str | None, tooltip: str) -> tuple:
    spec = {"tooltip": tooltip}
    if default is not None:
        spec["default"] = default
    return (list(options), spec)


def bool_widget(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def socket(kind: str, tooltip: str) -> tuple:
    return (kind, {"tooltip": tooltip})
