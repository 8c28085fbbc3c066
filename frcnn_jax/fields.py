"""Rules for config fields: each checks one value's type and range and raises `ConfigError`
naming the field (`config.train.learning_rate must be a number > 0, got -1`).

A section lists one rule per field (`RPNSettings.RULES`, `frcnn_jax.config.TRAIN_RULES`, ...);
`check_section` applies them and refuses a field the section does not have, so a misspelt field
in a config file is named instead of silently ignored. Rules that relate several fields (a
range's ends, the alternating scheme's lists) stay in the section's own checks.
"""

import dataclasses
import difflib
import numbers

import ml_collections

from frcnn_jax.errors import ConfigError


class Rule:
    """`rule(value, name)` raises `ConfigError` unless `test(value)`; `description` says what
    the field must be ("an integer > 0")."""

    def __init__(self, test, description):
        self.test = test
        self.description = description

    def __call__(self, value, name):
        try:
            ok = self.test(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            shown = repr(value)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise ConfigError(f"{name} must be {self.description}, got {shown}")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def number(*, low=None, above=None, high=None, below=None, integer=False):
    """A number (an integer with `integer`) with low <= value, above < value, value <= high,
    value < below where given."""
    bounds = [
        (low, lambda v: v >= low, f">= {low}"),
        (above, lambda v: v > above, f"> {above}"),
        (high, lambda v: v <= high, f"<= {high}"),
        (below, lambda v: v < below, f"< {below}"),
    ]
    bounds = [(test, text) for bound, test, text in bounds if bound is not None]
    kind = _is_integer if integer else _is_number
    description = ("an integer" if integer else "a number") + (
        " " + " and ".join(text for _, text in bounds) if bounds else ""
    )
    return Rule(lambda v: kind(v) and all(test(v) for test, _ in bounds), description)


def fraction():
    """A number in [0, 1]: IoU thresholds, fractions, probabilities."""
    return number(low=0, high=1)


def count(low=1):
    """An integer >= `low` (step counts, sizes, widths)."""
    return number(low=low, integer=True)


def choice(*allowed):
    return Rule(lambda v: v in allowed, f"one of {allowed}")


def flag():
    return Rule(lambda v: isinstance(v, bool), "True or False")


def text():
    return Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")


def optional(rule):
    """None or what `rule` allows."""
    return Rule(lambda v: v is None or rule.test(v), f"None or {rule.description}")


def sequence(item, *, length=None, min_length=0):
    """A tuple (or list) of values that `item` allows: exactly `length` of them, or at least
    `min_length`."""
    size = f"{length}" if length is not None else f"{min_length} or more" if min_length else ""
    description = f"a tuple of {size + ' ' if size else ''}values, each {item.description}"

    def test(value):
        if not isinstance(value, (tuple, list)) or not all(item.test(v) for v in value):
            return False
        return len(value) == length if length is not None else len(value) >= min_length

    return Rule(test, description)


def mapping():
    """None, a dict or a ConfigDict (a nested section)."""
    return Rule(
        lambda v: v is None or isinstance(v, (dict, ml_collections.ConfigDict)), "None or a dict"
    )


def check_section(values, rules, name):
    """Apply `rules` ({field: Rule}) to `values` (a ConfigDict, dict or dataclass instance) of
    the section called `name` ("config.train"); a field without a rule is an error naming it
    (and the closest known field)."""
    if dataclasses.is_dataclass(values):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    for field in values.keys():
        if field not in rules:
            close = difflib.get_close_matches(field, list(rules), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {sorted(rules)}"
            raise ConfigError(f"{name} has no field {field!r}{hint}")
    for field, rule in rules.items():
        if field in values:
            rule(values[field], f"{name}.{field}")
