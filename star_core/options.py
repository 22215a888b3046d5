"""User-facing option fields: a default with its help text and valid range, checked in one place.

A section of the run specification is a frozen dataclass whose fields are made with :func:`option`; every entry
point (argparse, ComfyUI node schemas) reads default, help, range and choices from the field's
:class:`OptionInfo`, and :class:`Section` validates a value against them, so a range is written once.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The value of an option that the run chooses itself from the memory budget (`star_core.autosize`).
AUTO = "auto"


class SpecError(ValueError):
    """A run option with an invalid value; ``path`` is its dotted name in the spec (e.g. ``"sampler.cfg"``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class OptionInfo:
    """
    What an entry point needs to present one option.

    Parameters:
        help (`str`): one or two sentences for tooltips and ``--help``.
        minimum (`float`, *optional*), maximum (`float`, *optional*): inclusive numeric range.
        choices (`tuple[str, ...]`, *optional*): the allowed strings.
        step (`float`, *optional*): a UI step for sliders/widgets.
        optional (`bool`): None is allowed (it means "off" or "automatic", as the help says).
        kind (`type`, *optional*): ``int``/``float``/``str``/``bool`` when the default does not show it.
        auto (`bool`): the value ``"auto"`` is allowed: the run chooses the largest value that fits its memory
            budget (`star_core.autosize`).
    """

    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    step: float | None = None
    optional: bool = False
    kind: type | None = None
    auto: bool = False


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           choices: Sequence[str] | None = None, step: float | None = None, optional: bool = False,
           kind: type | None = None, auto: bool = False) -> Any:
    """A dataclass field carrying its :class:`OptionInfo` (``field.metadata["option"]``)."""
    if default == AUTO and kind is None:
        raise TypeError("an option whose default is 'auto' must name its kind")
    info = OptionInfo(help, minimum, maximum, tuple(choices) if choices is not None else None, step,
                      optional or default is None, kind or (type(default) if default is not None else None),
                      auto or default == AUTO)
    return dataclasses.field(default=default, metadata={"option": info})


def info_of(section: type, name: str) -> OptionInfo:
    """The :class:`OptionInfo` of field ``name`` of a section class."""
    for f in dataclasses.fields(section):
        if f.name == name:
            return f.metadata["option"]
    raise KeyError(f"{section.__name__} has no option {name!r}")


def check_value(path: str, value: Any, info: OptionInfo) -> None:
    """Raises :class:`SpecError` naming ``path`` when ``value`` breaks ``info``'s type, range or choices."""
    if value is None:
        if not info.optional:
            raise SpecError(path, "must be set (None is not allowed)")
        return
    if info.auto and value == AUTO:
        return
    kind = info.kind
    or_auto = f" or {AUTO}" if info.auto else ""
    if kind is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"must be true or false, got {value!r}")
        return
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise SpecError(path, f"must be an integer{or_auto}, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise SpecError(path, f"must be a number{or_auto}, got {value!r}")
    if kind in (int, float) and not math.isfinite(value):
        raise SpecError(path, f"must be a finite number, got {value!r}")
    if info.choices is not None and value not in info.choices:
        raise SpecError(path, f"must be one of {', '.join(info.choices)}; got {value!r}")
    low, high = info.minimum, info.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else \
            (f">= {_fmt(low)}" if low is not None else f"<= {_fmt(high)}")
        raise SpecError(path, f"must be in {bounds}{or_auto}, got {value!r}")


def _fmt(number: float | None) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


class Section:
    """Base of a frozen options dataclass: every field is checked against its :class:`OptionInfo` on creation,
    then :meth:`check` adds the rules between fields. ``PREFIX`` is the section's name in error messages."""

    PREFIX = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if "option" in f.metadata:
                check_value(self.path(f.name), getattr(self, f.name), f.metadata["option"])
        self.check()

    def path(self, name: str) -> str:
        """Dotted name of a field for messages (``sampler.cfg``)."""
        return f"{self.PREFIX}.{name}" if self.PREFIX else name

    def check(self) -> None:
        """Rules that involve several fields (override)."""
