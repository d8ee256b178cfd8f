"""The extension when the install has none: a clear message naming what to do, no surprise build without a GPU,
a JIT cache keyed on what changes the binary, and (long profile) a real JIT build whose ops register."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personafuse_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_sources_are_found_in_a_checkout():
    assert _extension.sources_dir() == ROOT / "csrc"


def test_jit_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_JIT", "0")
    assert _extension.jit_unavailable() == "PERSONAFUSE_JIT=0"
    with pytest.raises(RuntimeError, match="cannot JIT-build the CUDA extension: PERSONAFUSE_JIT=0"):
        _extension.jit_build()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_jit_build_without_a_gpu():
    why = _extension.jit_unavailable()
    assert why is not None and ("GPU" in why or "CPU-only" in why or "nvcc" in why)


def test_cache_folder_is_keyed_on_torch_cuda_arch_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_CACHE_DIR", str(tmp_path))
    a80, a90 = _extension.jit_cache_dir("8.0"), _extension.jit_cache_dir("9.0")
    assert a80 != a90 and a80.parent == tmp_path / "jit"
    assert torch.__version__ in a80.name and "sm80" in a80.name and "sm90" in a90.name
    csrc = tmp_path / "csrc"
    import shutil

    shutil.copytree(ROOT / "csrc", csrc)
    monkeypatch.setattr(_extension, "sources_dir", lambda: csrc)
    assert _extension.jit_cache_dir("8.0") == a80  # same sources, same key
    (csrc / "include" / "pfk_common.h").write_text((csrc / "include" / "pfk_common.h").read_text() + "\n// edit\n")
    assert _extension.jit_cache_dir("8.0") != a80  # a header edit is a new build


def test_missing_extension_is_a_clear_message_in_the_api_and_in_check():
    """With _C unimportable, the cuda backend's error names the cause and the commands that fix it."""
    code = (
        "import sys; sys.modules['personafuse_kernels._C'] = None\n"  # as if the install had no extension
        "import os, torch, personafuse_kernels as pfk\n"
        "from personafuse_kernels import _extension\n"
        "err = _extension.extension_error()\n"
        "print(err)\n"
        "assert 'cuda' not in pfk.available_backends()\n"
        "try:\n"
        "    _extension.require_extension()\n"
        "except RuntimeError as exc:\n"
        "    assert str(exc) == err\n"
        "else:\n"
        "    raise SystemExit('require_extension did not raise')\n"
    )
    res = _run(code, {"PERSONAFUSE_JIT": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    msg = res.stdout
    assert "the CUDA extension" in msg and "no JIT build either (PERSONAFUSE_JIT=0)" in msg
    assert "pip install --no-build-isolation" in msg and "PERSONAFUSE_JIT=1" in msg

    check = ("import sys; sys.modules['personafuse_kernels._C'] = None\n"
             "from personafuse_kernels.cli import main; sys.exit(main(['check']))")
    res = _run(check, {"PERSONAFUSE_JIT": "0"}, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "no JIT build either" in res.stdout


@pytest.mark.long
def test_real_jit_build_registers_the_ops(tmp_path):
    why = _extension.jit_unavailable(need_gpu=False)
    if why is not None:
        pytest.skip(why)
    code = (
        "import torch\n"
        "from personafuse_kernels import _extension\n"
        "m = _extension.jit_build(need_gpu=False)\n"
        "print('module', m.__file__)\n"
        "for op in ('gate_forward', 'gate_backward', 'lora_decode_', 'lora_decode_linear', 'lora_shrink', 'lora_dhg',"
        " 'topk_pair_shrink', 'topk_pair_dhg', 'topk_expand_y_', 'topk_expand_dx_', 'topk_wgrad_B', 'topk_wgrad_A'):\n"
        "    print('op', op, getattr(torch.ops.personafuse, op).default._schema)\n"
    )
    env = {"PERSONAFUSE_CACHE_DIR": str(tmp_path), "TORCH_CUDA_ARCH_LIST": "8.0", "MAX_JOBS": "2"}
    first = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a second process started at the same time waits on the lock, then loads the first one's build
    second = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=3600) for p in (first, second)]
    for p, (out, err) in zip((first, second), outs):
        assert p.returncode == 0, err[-4000:]
        assert sum(line.startswith("op ") for line in out.splitlines()) == 11 and "personafuse::lora_shrink" in out
        assert str(tmp_path / "jit") in out
    messages = "".join(err for _, err in outs)
    assert messages.count("compiling the CUDA extension") == 1, messages[-3000:]
    assert messages.count("loading the cached CUDA extension") == 1, messages[-3000:]
