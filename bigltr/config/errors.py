"""ConfigError, the one error of bad config input, and the cut-down form of a bad value that its messages show."""
from __future__ import annotations

import reprlib
from typing import Any


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key."""


def brief(value: Any, limit: int = 200) -> str:
    """repr(value) cut to about `limit` characters: an error shows at most a line's worth of a bad value. reprlib
    bounds the work too: a huge nested value is never turned into text in full."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 4, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 12
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
