"""One file per schema revision, named ``<4-digit revision>_<what>.py``."""

import re
from pathlib import Path

__all__ = ["known_revisions"]


def known_revisions() -> set[str]:
    """The revision ids shipped with this version of the package."""
    return {m.group(1) for p in Path(__file__).parent.glob("*.py") for m in [re.match(r"^(\d{4})_", p.name)] if m}
