import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this variable when a kernel is decorated, so it must be set before sdpa_pass is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The suite checks answers, not speed: tuning compiles and times every config of each new
    # shape, and with it the GPU suite ran 8% of its tests in the 9 minutes it otherwise takes
    # whole (session 24). Tests of the tuning set it themselves; a value set by the caller stays.
    os.environ.setdefault("SDPA_PASS_AUTOTUNE", "0")



def _patch_the_interpreter_once_per_launch():
    """Triton's interpreter (3.9) patches triton.language's builtins (an inspect.getmembers
    walk over its modules) again on every call of a nested @triton.jit function, although the
    launch has patched them already and no one restores the nested patches: about a third of
    this suite's interpreter time (cProfile of a forward launch). Here a nested patch is
    skipped while the launch's is in place (the function's language modules already hold the
    interpreter's builtins); a launch still patches and restores as before. Where Triton's
    internals are not what this expects, nothing is changed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        patch_lang, empty_scope = interpreter._patch_lang, interpreter._LangPatchScope
        originals = {tl: tl.program_id, tl.core: tl.core.program_id}
    except (ImportError, AttributeError):
        return

    def patch_once(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and all(lang.program_id is not originals[lang] for lang in langs):
            return empty_scope()  # already patched by the launch; nothing of its own to undo
        return patch_lang(fn)

    interpreter._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_interpreter_once_per_launch()

# pytest-xdist runs one process per core; torch's own intra-op threads (one per core in each
# process) then only contend over tensors this small. The suite measured 8% faster on 2 cores
# with one thread per worker. A thread count set by the user (OMP_NUM_THREADS) is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_runtest_logreport(report):
    """SDPA_PASS_FAILURE_LOG=<file>: each failure's traceback appended to the file as it
    happens. pytest prints tracebacks only in its closing summary, which a run cut off by a
    time limit (the GPU calls of benchmarks/gpu_session.sh) never reaches; -v names the
    failures then, this keeps why. Written by the process that reports (xdist's controller,
    or the only process), so once per failure."""
    path = os.environ.get("SDPA_PASS_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with an empty Dynamo cache and a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Every test starts without remembered launches (kernels/launch.py), so a test that
    swaps a path chooser or a launch sees its own calls take the full path."""
    from sdpa_pass.kernels.launch import clear_plans

    clear_plans()
