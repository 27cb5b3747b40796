"""`python -m lowalign ...` without paying the imports each time: a fork server that has imported torch,
transformers, peft and lowalign once forks a child per command, and the child runs ``lowalign/__main__.py``
as the interpreter would (its own session, cwd, environment, stdout/stderr files, exit code, atexit).

Importing that stack takes ~12 s per process on a 2-core AMD EPYC (2026-12-03) (peft alone pulls in bitsandbytes,
torch._dynamo and transformers' model classes), which was most of a tiny-model test that starts three runs
(the SIGKILL/resume tests). A forked child starts with the modules loaded and no thread pool yet (the server
runs no tensor op), and exits through ``os._exit`` after the atexit handlers, like a fresh interpreter.

Used only when the command's environment agrees with the server's on every variable read at import time
(``IMPORT_TIME``: ``HF_HUB_OFFLINE``, ``OMP_NUM_THREADS``, ...; they would otherwise be stale):
:func:`forked_ok` says so, and callers fall back to a real subprocess. ``LOWALIGN_TEST_SUBPROCESS=1`` turns
the fork server off.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import runpy
import signal
import subprocess
import sys
import tempfile

PRELOAD = ["torch", "transformers", "peft", "lowalign.cli", "lowalign.api", "lowalign.bundle",
           "lowalign.algorithms.grpo", "lowalign.algorithms.dpo"]
# Variables a library may read while it is imported or a shared library while it loads (huggingface_hub's
# offline flag, OpenMP's thread count, glibc's malloc tunables, ...): a command whose value differs from the
# server's runs in a subprocess. Any other variable is read at run time, from the child's own environment.
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "PEFT_", "OMP_", "KMP_", "GOMP_", "MKL_",
               "OPENBLAS_", "PYTORCH_", "TORCH", "CUDA", "TRITON_", "BNB_", "BITSANDBYTES_", "PYTHON", "LD_",
               "MALLOC_", "GLIBC_")
IGNORED = {"PYTHONUNBUFFERED",  # set per command; the child's streams are line-buffered files anyway
           "TORCHINDUCTOR_CACHE_DIR"}  # set by torch itself inside the test process, after the server started

_ctx = None
_server_env: dict[str, str] | None = None


def _context():
    global _ctx, _server_env
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        _server_env = dict(os.environ)  # the server starts with the first Process, from this environment
    return _ctx


def forked_ok(env: dict[str, str]) -> bool:
    """Whether a command with environment ``env`` may run forked (the server's imports saw the same one)."""
    if os.environ.get("LOWALIGN_TEST_SUBPROCESS") == "1" or sys.platform != "linux":
        return False
    _context()
    strip = lambda e: {k: v for k, v in e.items() if k not in IGNORED}  # noqa: E731
    a, b = strip(env), strip(_server_env)
    return not any(k.startswith(IMPORT_TIME) for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    import atexit
    import traceback

    os.setsid()  # like subprocess's start_new_session: a kill of the group takes only this run
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # `python -m` puts the working directory first
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(os.devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["lowalign", *argv]
    code = 0
    try:
        runpy.run_module("lowalign", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the interpreter's rules: None is 0, an int is itself, anything else printed, 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start(argv: list[str], env: dict[str, str], cwd) -> tuple[mp.Process, str, str]:
    """Start ``python -m lowalign ARGV`` forked; returns the process and its stdout and stderr file paths."""
    out, err = (_empty_file(f"lowalign-{name}-") for name in ("out", "err"))
    # The server finds the target by name: runpy.run_path (stdlib) runs this file as __forked_child__, so the
    # server needs neither the repository on its sys.path nor a ``tests`` package.
    args = (list(argv), dict(env), str(cwd), out, err)
    p = _context().Process(target=runpy.run_path, args=(os.path.abspath(__file__),),
                           kwargs={"init_globals": {"_ARGS": args}, "run_name": "__forked_child__"}, daemon=False)
    p.start()
    return p, out, err


def _empty_file(prefix: str) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix)
    os.close(fd)
    return path


def run(argv: list[str], env: dict[str, str], cwd, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, lowalign, *argv], capture_output=True, text=True)``, forked."""
    p, out, err = start(argv, env, cwd)
    p.join(timeout)
    try:
        if p.exitcode is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.join()
            raise subprocess.TimeoutExpired(["lowalign", *argv], timeout)
        return subprocess.CompletedProcess(["lowalign", *argv], p.exitcode,
                                           _read(out), _read(err))
    finally:
        for f in (out, err):
            os.unlink(f)


def run_ranks(nproc: int, argv: list[str], env: dict[str, str], cwd, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m lowalign ARGV``, each rank forked: the variables
    torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and a
    free MASTER_PORT, read by ``init_process_group``'s env:// rendezvous). Exit code: the first rank's that
    failed, else 0; stdout and stderr: rank 0's then the others'."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [start(argv, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "WORLD_SIZE": str(nproc),
                          "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                   cwd) for r in range(nproc)]
    deadline = time.monotonic() + timeout
    failed = []
    try:
        while any(p.exitcode is None for p, *_ in ranks):
            failed = [p for p, *_ in ranks if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:  # torchrun stops the other ranks when one fails
                for p, *_ in ranks:
                    if p.exitcode is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.join()
                if not failed:
                    raise subprocess.TimeoutExpired(["lowalign", *argv], timeout)
                break
            time.sleep(0.05)
        # the rank that failed first, not one killed because of it (rank 0's -9 when rank 1 failed first)
        failed = failed or [p for p, *_ in ranks if p.exitcode != 0]
        code = failed[0].exitcode if failed else 0
        return subprocess.CompletedProcess(["lowalign", *argv], code, "".join(_read(o) for _, o, _ in ranks),
                                           "".join(_read(e) for *_, e in ranks))
    finally:
        for _, *files in ranks:
            for f in files:
                os.unlink(f)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


if __name__ == "__forked_child__":  # runpy.run_path in a forked child (start)
    _child(*_ARGS)  # noqa: F821  (_ARGS: run_path's init_globals)
