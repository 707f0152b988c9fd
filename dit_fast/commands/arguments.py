"""argparse types of the commands' flags: the range checks of ``dit_fast.utils.validation`` as usage errors.

A bad value fails at parse time, one line and exit status 2: ``--max-steps -5`` -> ``argument --max-steps: must be
an integer >= 1, got '-5'``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from dit_fast.utils import validation

T = TypeVar("T")


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type``: its ValueError message becomes the usage error's message."""

    def parse_argument(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse_argument.__name__ = getattr(parse, "__name__", "value")
    return parse_argument


def int_arg(min_value: int | None = None, max_value: int | None = None) -> Callable[[str], int]:
    """Integers in ``[min_value, max_value]`` (either bound optional)."""
    return argument_type(validation.int_range(min_value, max_value))


def float_arg(min_value: float | None = None, max_value: float | None = None, *,
              exclusive_min: bool = False) -> Callable[[str], float]:
    """Finite floats in ``[min_value, max_value]`` (``(min_value, ...`` with ``exclusive_min``)."""
    return argument_type(validation.float_range(min_value, max_value, exclusive_min=exclusive_min))


positive_int = argument_type(validation.positive_int)
non_negative_int = argument_type(validation.non_negative_int)
