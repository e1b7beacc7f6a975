"""What a tool shows on the terminal: its own lines, one `error:` line per failure, nothing else.

Every console tool runs its body through `run`:

* an error the user can fix (ValueError, OSError: bad input, a missing or unwritable file) is one
  `error: ...` line, exit status 2; any other exception is one `error:` line that names the log
  holding its traceback, exit status 1; Ctrl-C outside the training loop (which saves first:
  `train/checkpoint.py`) is one line, exit status 130;
* what libraries write to stderr (TensorFlow's and XLA's C++ logs, Python warnings, Orbax's
  thread tracebacks, TensorStore's unraisable coroutines, libjpeg's warnings) goes to a log
  file: stderr's file descriptor is pointed at it, and the tool's own lines go to the terminal
  through a copy of the original descriptor. The log starts as a temporary file; a training run
  moves it into its workdir (`keep_log_in`, `WORKDIR/log.txt`, appended to on every start; a
  gs:// run keeps the temporary file and names it); another tool's temporary log is deleted
  when it ends without an unexpected error, else named.

With `--debug` nothing is redirected and errors raise with their traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
import traceback

# Errors a user causes and fixes: bad values, missing or unreadable files, unwritable places.
USER_ERRORS = (ValueError, OSError)
LOG_NAME = "log.txt"  # a training run's library output, in its workdir


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a bad command line as one `error:` line (not the usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the flags)\n")


def positive(kind):
    """An argparse type: a number of `kind` (int or float) above 0, refused by name otherwise
    (a zero batch or temperature divides by zero, zero epochs trains nothing)."""

    def parse(text: str):
        value = kind(text)  # argparse names the flag and the text if this raises
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def at_least_zero(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; a flag's help ends with its default, if it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class _Session:
    """The redirection of one tool's run (see the module docstring)."""

    def __init__(self, prog: str):
        fd, self.log_path = tempfile.mkstemp(prefix=f"{prog}-", suffix=".log")
        self.temporary = True
        self.keep = False
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = os.dup(2)
        try:  # a real terminal (or pipe): write through a copy of its descriptor
            real = sys.stderr.fileno() == 2
        except (AttributeError, ValueError, io.UnsupportedOperation):
            real = False  # captured in-process (pytest): write where the caller reads
        self.terminal = os.fdopen(os.dup(2), "w", buffering=1) if real else sys.stderr
        self._terminal_is_copy = real
        self._header(fd, prog)
        os.dup2(fd, 2)
        os.close(fd)
        # Python's own stderr writes (warnings, unraisable exceptions, thread tracebacks) follow.
        self._stderr, sys.stderr = sys.stderr, open(2, "w", buffering=1, closefd=False,  # noqa: SIM115
                                                    encoding="utf-8", errors="replace")

    @staticmethod
    def _header(fd: int, prog: str) -> None:
        line = f"==== {prog} {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.write(fd, line.encode())

    def move_to(self, path: str) -> None:
        """Continue the log at `path` (appended to), with what was logged so far."""
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with open(self.log_path, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:
            shutil.copyfileobj(f, out)
        os.dup2(fd, 2)
        os.close(fd)
        os.unlink(self.log_path)
        self.log_path, self.temporary = path, False

    def log(self, text: str) -> None:
        sys.stderr.flush()
        os.write(2, text.encode(errors="replace"))

    def close(self) -> None:
        sys.stderr.flush()
        if self.temporary and not self.keep:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
        if self._terminal_is_copy:
            self.terminal.close()
            # The interpreter's exit still runs library code (asyncio's leftover tasks log
            # their exceptions when collected): send what it writes to the log then.
            global _exit_log
            if _exit_log is None:
                atexit.register(_quiet_exit)
            _exit_log = os.devnull if self.temporary else self.log_path
        # The caller's stderr back; the session's stream stays open for the logging handlers
        # made meanwhile, writing to what fd 2 is again.
        sys.stderr = self._stderr
        os.dup2(self._saved, 2)
        os.close(self._saved)


_exit_log: str | None = None  # where stderr goes while the process exits (the last log)


def _quiet_exit() -> None:
    sys.stderr.flush()
    fd = os.open(_exit_log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)


_session: _Session | None = None


def terminal():
    """Where the tool's own messages for the user go (stderr, past the log redirection)."""
    return _session.terminal if _session is not None else sys.stderr


def say(line: str) -> None:
    """One line for the user on stderr (warnings, the signal notices), never into the log."""
    print(line, file=terminal(), flush=True)


def keep_log_in(workdir: str) -> str | None:
    """Continue the library log in WORKDIR/log.txt (a local workdir that now holds a run; other
    processes: log.<i>.txt); returns its path. A remote (gs://) workdir keeps the local
    temporary log to the end: its path is returned for the run to name."""
    if _session is None:
        return None
    if "://" in workdir:
        _session.keep = True
        return _session.log_path
    import jax

    name = LOG_NAME if jax.process_index() == 0 else f"log.{jax.process_index()}.txt"
    _session.move_to(os.path.join(workdir, name))
    return _session.log_path


def run(prog: str, body, *, debug: bool = False) -> int:
    """Runs `body()` as the tool `prog` (see the module docstring); returns the exit status
    (`body`'s result if it is an int, else 0)."""
    global _session
    if debug:
        return _status(body())
    _session = session = _Session(prog)
    try:
        return _status(body())
    except KeyboardInterrupt:
        say(f"{prog}: interrupted (Ctrl-C)")
        return 130
    except USER_ERRORS as e:
        say(f"error: {_one_line(e)}")
        return 2
    except Exception as e:  # noqa: BLE001 - a bug or a library failure: traceback to the log
        session.log(traceback.format_exc())
        session.keep = True
        say(f"error: {type(e).__name__}: {_one_line(e)} (the traceback is in "
            f"{session.log_path}; --debug prints it)")
        return 1
    finally:
        _session = None
        session.close()


def _status(result) -> int:
    return result if isinstance(result, int) else 0


def _one_line(e: BaseException, limit: int = 4) -> str:
    """The message on one line; an OSError as 'path: cause' (no errno). A message listing its
    problems one a line (a conversion's missing tensors) keeps the first `limit` of them."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    head, *items = str(e).strip().splitlines() or [""]
    if len(items) > limit:
        items = [*items[:limit], f"... and {len(items) - limit} more (--debug lists them)"]
    return " ".join(" ".join([head, *items]).split()) or type(e).__name__
