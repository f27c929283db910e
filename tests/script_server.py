"""A warm interpreter that runs the project's scripts in forked children (used by tests.conftest.run_script).

A script's process spends seconds importing torch, timm and Hydra before it reads its command line; the
suite starts dozens of them. This server imports those libraries (and `avs`, which every script imports)
once; each request forks a child that runs scripts/<name> as `python scripts/<name> <args>` would: as
__main__, with sys.argv, sys.path[0] = scripts/ followed by the entries of the request's PYTHONPATH, the given
cwd and environment, stdin from /dev/null,
stdout/stderr to files, atexit handlers, and the interpreter's exit code (SystemExit's code; an uncaught
exception prints its traceback and gives 1). Whatever the imports printed when the server started is
printed again by every child, as a fresh interpreter would print it.

Protocol: one JSON request per line on stdin ({"script", "args", "cwd", "env", "stdout", "stderr",
"timeout"}), one JSON reply per line on stdout ({"returncode", "timed_out"}). The first line written is
{"ready": true}, after the imports. The server ends when its stdin closes.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_libraries() -> tuple[str, str]:
    """Import what every script imports first; -> what that printed on (stdout, stderr)."""
    sys.path.insert(0, PROJECT_ROOT)  # the scripts put the project root first the same way
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            import hydra  # noqa: F401
            import omegaconf  # noqa: F401
            import timm  # noqa: F401
            import torch  # noqa: F401

            import avs  # noqa: F401
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        noise = []
        for fh in (out, err):
            fh.seek(0)
            noise.append(fh.read().decode(errors="replace"))
    sys.path.remove(PROJECT_ROOT)
    return noise[0], noise[1]


def _pythonpath(env: dict) -> list[str]:
    """sys.path entries an interpreter adds for env's PYTHONPATH (made absolute, as `site` does)."""
    return [os.path.abspath(e) for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]


def _set_path(script: str, env: dict) -> None:
    """sys.path as `python <script>` would start with `env`: the script's folder, PYTHONPATH, the rest."""
    ours = _pythonpath(os.environ)  # still the server's environment here
    rest = sys.path[1:]
    if rest[: len(ours)] == ours:
        rest = rest[len(ours) :]
    sys.path[:] = [os.path.dirname(script), *_pythonpath(env), *rest]


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)  # sys.exit("message"): printed, exit code 1
    return 1


def _child(req: dict, noise: tuple[str, str]) -> None:
    """In the forked child: become `python <script> <args>`; never returns."""
    code = 1
    try:
        os.chdir(req["cwd"])
        _set_path(req["script"], req["env"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.stdout.write(noise[0])
        sys.stderr.write(noise[1])
        script = req["script"]
        sys.argv = [script, *req["args"]]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001  (the child must never return into the server's loop)
        traceback.print_exc()
    finally:
        os._exit(code)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": True}
        time.sleep(0.01)


def serve() -> None:
    noise = _import_libraries()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, noise)
        print(json.dumps(_wait(pid, float(req["timeout"]))), flush=True)


if __name__ == "__main__":
    serve()
