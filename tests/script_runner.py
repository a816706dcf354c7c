"""Run a repository script (the probes' ``--compile`` modes: sm_90 compiles without the
interpreter) as if in a fresh ``python script args...`` subprocess, but in a long-lived one.

A fresh interpreter pays ~5 s before it compiles anything (torch and sdpa_pass imported,
Triton's NVIDIA backend started and its cache key hashed): the compile tests took 415 s on two
CPUs that way and ~110 s here (session 32). Here each pytest process keeps one server per environment (the
test's environment without TRITON_INTERPRET and pytest's per-test variable); a request runs
the script with ``runpy`` as ``__main__`` and returns its exit code and output, and the modules
it imported from ``benchmarks/`` are dropped afterwards, so each run starts from the script's
own module state as a fresh process would (the library and Triton stay imported: their state
is the same for every run of one environment). SDPA_PASS_TEST_FRESH_SCRIPTS=1 runs every
request in a fresh subprocess instead, the reference for what a server run must match.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import runpy
import select
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# variables that change between tests without changing what a script does
_PER_TEST = ("TRITON_INTERPRET", "PYTEST_CURRENT_TEST")

_servers: dict[tuple, tuple[subprocess.Popen, object]] = {}


def _key(env: dict) -> tuple:
    return tuple(sorted(env.items()))


def _server(env: dict) -> tuple[subprocess.Popen, object]:
    key = _key(env)
    entry = _servers.get(key)
    if entry is not None and entry[0].poll() is None:
        return entry
    # the server's own stderr (Triton's and ptxas' writes below Python) to a file, read back
    # if it dies; a pipe nobody reads could fill and stall it
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, text=True)
    _servers[key] = (proc, log)
    return proc, log


def _drop(env: dict) -> str:
    """Stop the environment's server; its stderr's tail."""
    proc, log = _servers.pop(_key(env))
    proc.kill()
    proc.wait()
    log.seek(0)
    return log.read()[-3000:]


@atexit.register
def _stop_servers() -> None:
    for proc, _ in _servers.values():
        with contextlib.suppress(OSError):
            proc.stdin.close()
    for proc, _ in _servers.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_python(*argv: str | Path, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python *argv`` (a script and its arguments, or ``-c CODE args``) in ROOT under
    ``env`` (default: this process's environment) without TRITON_INTERPRET: its exit code,
    stdout and stderr."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in _PER_TEST}
    argv = [str(arg) for arg in argv]
    if os.environ.get("SDPA_PASS_TEST_FRESH_SCRIPTS") == "1":
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=timeout)
    proc, _ = _server(env)
    proc.stdin.write(json.dumps({"argv": argv}) + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        tail = _drop(env)
        raise RuntimeError(f"script server {'timed out' if not ready else 'died'} running "
                           f"{argv}:\n{tail}")
    reply = json.loads(line)
    return subprocess.CompletedProcess(argv, reply["returncode"], reply["stdout"],
                                       reply["stderr"])


def last_line(*argv: str | Path, env: dict | None = None) -> str:
    """The last line ``python *argv`` prints (``run_python``), which must exit with 0."""
    result = run_python(*argv, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def last_json(script: str, *args: str, fp_fusion: bool = True) -> dict:
    """``benchmarks/<script> *args``'s last line of output, read as JSON (the probes' compile
    reports); ``fp_fusion``: TRITON_DEFAULT_FP_FUSION=1 unless the environment sets it, as
    the probes' compiles are read (the library's launches fuse FMAs too)."""
    env = dict(os.environ)
    if fp_fusion:
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return json.loads(last_line(BENCHMARKS / script, *args, env=env))


def _serve() -> None:
    """The server: one JSON request a line on stdin, one JSON reply a line on the protocol's
    own descriptor (stdout's, duplicated before stdout is pointed at stderr, so nothing below
    Python that writes to stdout can corrupt a reply)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        argv = json.loads(line)["argv"]
        out, err = io.StringIO(), io.StringIO()
        path, modules = list(sys.path), set(sys.modules)
        inline = argv[0] == "-c"
        sys.argv = ["-c", *argv[2:]] if inline else list(argv)
        # sys.path[0] as ``python -c`` / ``python script`` has it
        sys.path.insert(0, "" if inline else str(Path(argv[0]).resolve().parent))
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                if inline:
                    exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
                else:
                    runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                err.write(f"{exc.code}\n")
                code = 1
        except BaseException:  # noqa: BLE001 - reported as a failed run, as Python would
            err.write(traceback.format_exc())
            code = 1
        finally:
            sys.path[:] = path
            for name in set(sys.modules) - modules:
                origin = getattr(sys.modules[name], "__file__", None) or ""
                if Path(origin).resolve().is_relative_to(BENCHMARKS):
                    del sys.modules[name]
        replies.write(json.dumps({"returncode": code, "stdout": out.getvalue(),
                                  "stderr": err.getvalue()}) + "\n")


if __name__ == "__main__":
    _serve()
