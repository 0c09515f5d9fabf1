"""One file per schema revision."""

__all__: list[str] = []
