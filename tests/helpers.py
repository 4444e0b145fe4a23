"""Running the `sdpo` command inside the test process, as a user runs it from a shell."""

import contextlib
import io
import os
from dataclasses import dataclass


@dataclass
class Ran:
    """What a command left behind: its exit status and what it printed (as subprocess.CompletedProcess names them)."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _working_folder(folder):
    """contextlib.chdir, which Python 3.10 lacks."""
    saved = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def _environment(extra: dict[str, str] | None):
    saved = dict(os.environ)
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _threads(number: int | None):
    import torch

    saved = torch.get_num_threads()
    if number is not None:
        torch.set_num_threads(number)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sdpo(*args, cwd=None, env=None, threads: int | None = None) -> Ran:
    """`sdpo ARGS...` run in this process (no interpreter start-up, no second torch import).

    The command's own entry point runs, so a user error ends in its one `error:` line and exit
    status 2 exactly as in a shell; an unexpected exception propagates and fails the test. Tests
    where a separate process is the point (SIGKILL, torchrun) start one themselves; `threads`
    matches such a process's OMP_NUM_THREADS where numbers are compared with it.

    Environment, working folder and torch threads are restored afterwards; what a process keeps
    (seeded global RNGs, accelerate's state, glibc malloc settings a baseline run makes) is not.
    """
    from sdpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(_working_folder(cwd))
        stack.enter_context(_environment(env))
        stack.enter_context(_threads(threads))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): Python prints the message and exits with 1
                print(exit_.code, file=err)
                code = 1
    return Ran(code, out.getvalue(), err.getvalue())


def assert_user_error(result: Ran, *fragments: str) -> None:
    """Exit status 2, one `error:` line holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]
