"""The one exception users see: a short message naming what is wrong."""


class ESMIndexError(Exception):
    """Bad input or a broken index. The message is one line, fit to print as it is."""
