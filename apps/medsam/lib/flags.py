"""The one reading of a yes/no option: `--conf` values, request fields and train options."""

from __future__ import annotations

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def flag(value: object, default: bool) -> bool:
    """A bool as it is; 1/true/yes/on or 0/false/no/off in any case; None or "" -> `default`.
    Anything else raises ValueError."""
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return default
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")
