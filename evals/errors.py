"""The evaluation's own error: a benchmark that cannot be read, named with what would be accepted."""
from core.errors import ClipkdError


class EvalDatasetError(ClipkdError, ValueError):
    pass
