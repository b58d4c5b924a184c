"""Loading the Triton kernels for the Triton interpreter when there is no GPU (shared by the kernel tests and the
in-engine Triton test)."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def load_kernels() -> ModuleType:
    """The kernel module (steerserve.kernels.attention); without a GPU, built for the Triton interpreter.

    triton picks interpreter or compiler when `@triton.jit` runs (triton.knobs.runtime.interpret reads
    TRITON_INTERPRET then), i.e. when a module is imported. That also holds for triton's own @jit library
    (tl.zeros, tl.max, tl.sum...): if something imported triton earlier in this session (vLLM does), both it and
    our module were decorated for the compiler, which cannot run here ("0 active drivers"), so re-import them
    with the variable set. The variable is restored afterwards (servers that later tests start inherit
    os.environ); callers set it again around each launch (triton checks it at launch time too).
    Skips the calling module if triton cannot run the kernels here.
    """
    if torch.cuda.is_available():
        return importlib.import_module("steerserve.kernels.attention")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not installed")
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):
            importlib.reload(tl.standard)
            importlib.reload(tl)
        module = importlib.import_module("steerserve.kernels.attention")
        if not isinstance(module._paged_attention_kernel, InterpretedFunction):
            module = importlib.reload(module)
    except ImportError as exc:
        pytest.skip(f"triton cannot run the kernels here: {exc!r}", allow_module_level=True)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module
