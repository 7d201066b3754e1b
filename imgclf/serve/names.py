"""Class names as printed by evaluate and imgclf-predict (their CSV and JSON quote names their own way)."""


def display_name(name: str) -> str:
    r"""A class name as one line of text: a newline, tab or other control character is shown
    escaped (``\n``), as Python writes it, so a folder named with one cannot break the output."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
