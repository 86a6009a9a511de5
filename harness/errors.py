"""The base of every error clipkd reports as one clear message (kept import-light for the CLI)."""


class ClipkdError(Exception):
    """An error whose message names the file, field or value at fault and what would be accepted."""
