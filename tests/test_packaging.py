"""The package as users get it: the sdist holds every file the build needs (default profile, seconds), and in the
long profile a wheel built from that sdist compiles, installs outside the checkout and runs.

The sdist is built from a copy of the tree, so the checkout's own build facts (_build_info.py) are not touched.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders never copied into the build tree: build outputs and caches.
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "out", "runs"}
SKIP_SUFFIXES = (".so", ".o", ".pyc", ".egg-info", ".tmp")


def _source_files() -> list[Path]:
    """Paths (relative to the root) of the tree's source files: what a clean clone holds."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath, name).relative_to(ROOT)
            if not name.endswith(SKIP_SUFFIXES) and path != Path("personafuse_kernels/_build_info.py"):
                out.append(path)
    return sorted(out)


def required_files() -> list[str]:
    """What the sdist must hold: every file under csrc/, docs/, tests/ and python/, the package data, README,
    LICENSE and the build files."""
    need = []
    for p in _source_files():
        top = p.parts[0]
        if (top in ("csrc", "docs", "tests", "python")
                or (top == "personafuse_kernels" and p.suffix in (".py", ".json"))
                or str(p) in ("README.md", "LICENSE", "MANIFEST.in", "setup.py", "pyproject.toml")):
            need.append(p.as_posix())
    return need


def unresolved_includes(files: set[str]) -> list[str]:
    """`#include "x"` lines in csrc/ whose file is in none of the including folder, csrc/include and (for the CPU
    emulation build of the tests) tests/cuda_emu/include."""
    bad = []
    for name in sorted(f for f in files if f.startswith("csrc/")):
        text = (ROOT / name).read_text(errors="ignore")
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
            here = (Path(name).parent / inc).as_posix()
            if not {here, f"csrc/include/{inc}", f"tests/cuda_emu/include/{inc}"} & files:
                bad.append(f"{name}: {inc}")
    return bad


def build_sdist(tmp: Path, manifest: str | None = None) -> tuple[Path, set[str]]:
    """sdist of a copy of the tree (optionally with another MANIFEST.in); returns its path and its file names
    relative to the archive's top folder."""
    src = tmp / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    if manifest is not None:
        (src / "MANIFEST.in").write_text(manifest)
    env = {**os.environ, "PERSONAFUSE_SKIP_CUDA_BUILD": "1"}
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    return sdist, names


def test_required_files_cover_the_build():
    need = set(required_files())
    assert {"csrc/personafuse_ops.cpp", "csrc/include/pfk_device.cuh", "csrc/topk/topk_block.cuh",
            "personafuse_kernels/data/persona_dialogues.json", "LICENSE", "README.md"} <= need
    assert not unresolved_includes(need), "the tree itself has an #include of a file that does not exist"


def test_sdist_holds_every_file_the_build_needs(tmp_path):
    _, names = build_sdist(tmp_path)
    missing = sorted(set(required_files()) - names)
    assert not missing, f"the sdist lacks {len(missing)} file(s) the build or the package needs: {missing[:20]}"
    assert not unresolved_includes(names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py")]


def test_a_broken_manifest_is_caught(tmp_path):
    """The check above can fail: an sdist whose manifest forgets the headers is reported."""
    manifest = (ROOT / "MANIFEST.in").read_text().replace("graft csrc", "recursive-include csrc *.cu *.cpp")
    _, names = build_sdist(tmp_path, manifest)
    missing = set(required_files()) - names
    assert "csrc/include/pfk_device.cuh" in missing and "csrc/topk/topk_block.cuh" in missing
    assert "csrc/gate/gate_kernels.cu: pfk_device.cuh" in unresolved_includes(names)


# ------------------------------------------------------------------ long profile: wheel, install, run


# The checkout's editable install puts a finder on sys.meta_path that resolves personafuse_kernels.* in the
# checkout when the installed copy lacks a module (such as _C): a subprocess that tests an installed copy drops it.
WITHOUT_EDITABLE_INSTALL = ("import sys\n"
                            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
                            "str(getattr(f, '__module__', ''))]\n")


def _install_outside(tmp_path: Path, wheel: Path) -> tuple[Path, Path]:
    """pip install --target the wheel (no deps: the environment's torch serves), and an empty working folder
    outside the checkout to run it from."""
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    return site, outside


def _can_build_extension() -> str | None:
    import torch

    if torch.version.cuda is None:
        return "a CPU-only torch cannot build the extension"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found"
    return None


@pytest.mark.long
def test_wheel_from_sdist_installs_and_runs_outside_the_checkout(tmp_path):
    why = _can_build_extension()
    if why:
        pytest.skip(why)
    sdist, _ = build_sdist(tmp_path)
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "PERSONAFUSE_SKIP_CUDA_BUILD"}
    env["PERSONAFUSE_FORCE_CUDA_BUILD"] = "1"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                          str(wheels), str(sdist)], env=env, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    (wheel,) = wheels.glob("personafuse_kernels-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert any(re.fullmatch(r"personafuse_kernels/_C\..*\.so", n) for n in names), "no compiled extension"
    assert "personafuse_kernels/data/persona_dialogues.json" in names
    assert "personafuse_kernels/_build_info.py" in names
    assert "personafuse_kernels/_csrc/include/pfk_device.cuh" in names  # sources for a JIT rebuild
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "personafuse = personafuse_kernels.cli:main" in entry_points
    assert any(n.startswith(f"{dist_info}/") and n.endswith("LICENSE") for n in names)
    assert "Apache-2.0" in metadata

    site, outside = _install_outside(tmp_path, wheel)
    run_env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    smoke = WITHOUT_EDITABLE_INSTALL + r'''
import json, sys, torch
import personafuse_kernels as pfk
from personafuse_kernels import _extension, build_info
mod, err = _extension.load_extension()
x = torch.randn(7, 33, requires_grad=True)
W, b = torch.randn(45, 33), torch.randn(45)
A = torch.randn(3, 4, 33, requires_grad=True); B = torch.randn(3, 45, 4, requires_grad=True)
g = torch.rand(7, 3, requires_grad=True)
y = pfk.routed_lora(x, W, b, A, B, g, scaling=2.0, backend="torch")
y.square().sum().backward()
from importlib import resources
data = resources.files("personafuse_kernels").joinpath("data/persona_dialogues.json")
print(json.dumps({"data": str(data), "data_ok": len(json.loads(data.read_text())) > 0, "package": pfk.__file__,
                  "ext": getattr(mod, "__file__", None), "err": err,
                  "built": build_info()["extension_built"], "version": pfk.__version__,
                  "grads": all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (x, A, B, g))}))
'''
    res = subprocess.run([sys.executable, "-c", smoke], cwd=outside, env=run_env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["package"].startswith(str(site)), facts
    assert facts["ext"] and facts["ext"].startswith(str(site)) and facts["err"] is None, facts
    assert facts["built"] and facts["grads"], facts
    assert facts["data_ok"] and facts["data"].startswith(str(site)), facts
    res = subprocess.run([str(site / "bin" / "personafuse"), "check"], cwd=outside, env=run_env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "all available backends pass" in res.stdout
    res = subprocess.run([str(site / "bin" / "personafuse"), "--version"], cwd=outside, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == f"personafuse-kernels {facts['version']}"


@pytest.mark.long
def test_isolated_build_installs_without_the_extension_and_says_how_to_get_it(tmp_path):
    """A plain `pip install` of the sdist builds in isolation, where torch is absent: the wheel has no _C but carries
    the sources for the JIT path, and the cuda backend's message says what happened and what to do."""
    sdist, _ = build_sdist(tmp_path)
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(sdist)],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0 and "No matching distribution found for setuptools" in res.stderr:
        pytest.skip("no package index for the isolated build environment")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    (wheel,) = wheels.glob("personafuse_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        facts = zf.read("personafuse_kernels/_build_info.py").decode()
    assert not any("/_C." in n for n in names)
    assert "personafuse_kernels/_csrc/personafuse_ops.cpp" in names
    assert "personafuse_kernels/_csrc/include/pfk_device.cuh" in names
    assert "extension_built = False" in facts and "torch is not installed at build time" in facts
    site, outside = _install_outside(tmp_path, wheel)
    code = (WITHOUT_EDITABLE_INSTALL + "from personafuse_kernels import _extension\n"
            "print(_extension.sources_dir())\n"
            "print(_extension.extension_error())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=outside, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr[-3000:]
    sources, error = res.stdout.strip().splitlines()[-2:]
    assert sources == str(site / "personafuse_kernels" / "_csrc")
    assert "the CUDA extension was not built (torch is not installed at build time" in error
    assert "pip install --no-build-isolation" in error
