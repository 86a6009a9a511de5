"""The base of every error clipkd reports as one clear message (kept import-light for the CLI)."""
import contextlib
from collections.abc import Iterator


class ClipkdError(Exception):
    """An error whose message names the file, field or value at fault and what would be accepted."""


WORKER_PREAMBLE = "in DataLoader worker process"


def worker_message(error: BaseException) -> str:
    """The message of an exception a loader worker raised, without what torch wraps it in: it re-raises it in the
    main process as the same type whose message starts "Caught X in DataLoader worker process N. Original
    Traceback …" and ends with the formatted original ("module.X: message")."""
    message = str(error)
    if WORKER_PREAMBLE not in message or "Original Traceback" not in message:
        return message
    marker = f"{type(error).__name__}: "
    return message[message.rfind(marker) + len(marker):].rstrip() if marker in message else message


@contextlib.contextmanager
def worker_errors_unwrapped() -> Iterator[None]:
    """Re-raises an error that came from a loader worker with the worker's own message, its type kept: a
    ``clipkd: error:`` line, not twenty lines of another process's frames."""
    try:
        yield
    except Exception as error:
        if WORKER_PREAMBLE not in str(error):
            raise
        try:
            unwrapped = type(error)(worker_message(error))
        except Exception:  # a type that cannot be built from a message alone keeps torch's wrapping
            raise error from None
        raise unwrapped from None
