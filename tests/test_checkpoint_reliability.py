"""Adapter checkpoints under failure: router settings saved and checked, versions, unknown or non-finite tensors,
merged models, and saves that fail at each write step (errors injected by patching the write calls: CI runs as
root, where chmod does not block writes). After any failure a load gives the old state, the new one, or raises."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from helpers import randomize_adapters, tiny_llama

import personafuse_kernels as pfk
from personafuse_kernels.integration import checkpoint

IDS = torch.tensor([[5, 9, 3, 7, 1, 22, 8]])


def _model(seed=1, **kw):
    args = {"num_experts": 3, "rank": 2, "verbose": False, **kw}
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], **args)
    return randomize_adapters(model, seed=seed)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("saved,loaded,key", [
    ({"temperature": 0.25, "top_k": 2}, {}, "temperature"),
    ({"top_k": 2}, {}, "top_k"),
    ({"top_k": 2, "capacity_factor": 1.5}, {"top_k": 2}, "capacity_factor"),
    ({"router": "sequence", "context_features": 6}, {"router": "sequence"}, "context_features"),
])
def test_router_settings_are_saved_and_checked(tmp_path, saved, loaded, key):
    pfk.save_adapters(_model(**saved), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / checkpoint.CONFIG_NAME).read_text())
    assert all(layer[key] == saved[key] for layer in cfg["layers"].values())
    other = _model(seed=2, **loaded)
    before = _logits(other)
    with pytest.raises(ValueError, match=key):
        pfk.load_adapters(other, tmp_path / "ckpt")
    assert torch.equal(_logits(other), before)
    same = _model(seed=2, **saved)
    pfk.load_adapters(same, tmp_path / "ckpt")  # the same settings load


def _edit_config(folder, fn):
    path = folder / checkpoint.CONFIG_NAME
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_unknown_version_is_refused(tmp_path):
    pfk.save_adapters(_model(), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", lambda c: c.update(version=99))
    with pytest.raises(ValueError, match="format version 99"):
        pfk.load_adapters(_model(seed=2), tmp_path / "ckpt")


def test_version_1_loads_with_a_warning(tmp_path):
    model = _model()
    pfk.save_adapters(model, tmp_path / "ckpt")

    def downgrade(c):
        c["version"] = 1
        del c["save_id"]
        for layer in c["layers"].values():
            for k in checkpoint.ROUTER_SETTINGS:
                layer.pop(k)

    _edit_config(tmp_path / "ckpt", downgrade)
    other = _model(seed=2)
    with pytest.warns(UserWarning, match="version-1 checkpoint"):
        pfk.load_adapters(other, tmp_path / "ckpt")
    assert torch.equal(_logits(other), _logits(model))


def _rewrite_weights(folder, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / checkpoint.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update(stowaway=torch.zeros(3)), "no routed layer has"),
    (lambda t: t[next(k for k in t if k.endswith("lora_B"))].view(-1).__setitem__(0, float("nan")),
     "NaN or infinite"),
    (lambda t: t[next(k for k in t if k.endswith("lora_A"))].view(-1).__setitem__(1, float("inf")),
     "NaN or infinite"),
])
def test_unknown_and_non_finite_tensors_are_refused(tmp_path, edit, match):
    pfk.save_adapters(_model(), tmp_path / "ckpt")
    _rewrite_weights(tmp_path / "ckpt", edit)
    other = _model(seed=2)
    before = _logits(other)
    with pytest.raises(ValueError, match=match):
        pfk.load_adapters(other, tmp_path / "ckpt")
    assert torch.equal(_logits(other), before)


def test_loading_into_a_merged_model_is_refused(tmp_path):
    pfk.save_adapters(_model(router="external"), tmp_path / "ckpt")
    other = _model(seed=2, router="external")
    pfk.merge(other, torch.tensor([0.2, 0.5, 0.3]))
    with pytest.raises(RuntimeError, match="unmerge the model before loading"):
        pfk.load_adapters(other, tmp_path / "ckpt")


# ---------------------------------------------------------------- fault injection


@pytest.fixture
def saved_twice(tmp_path):
    """A folder with an old checkpoint (and a stranger's file), and a model with different adapters to save."""
    folder = tmp_path / "ckpt"
    old = _model(seed=1)
    pfk.save_adapters(old, folder)
    (folder / "trainer_state.json").write_text("{}")
    return folder, old, _model(seed=5)


def _load_state(folder):
    """'old', 'new'-independent: the logits a fresh model gets from the folder, or the exception."""
    fresh = _model(seed=9)
    try:
        pfk.load_adapters(fresh, folder)
    except (ValueError, FileNotFoundError) as exc:
        return exc
    return _logits(fresh)


def _fail_nth(monkeypatch, target, name, n, err):
    real, calls = getattr(target, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failing_weights_write_keeps_the_old_checkpoint(saved_twice, monkeypatch, err):
    import safetensors.torch

    folder, old, new = saved_twice
    _fail_nth(monkeypatch, safetensors.torch, "save_file", 1, err)
    with pytest.raises(OSError):
        pfk.save_adapters(new, folder)
    assert _files(folder) == sorted([checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, "trainer_state.json"])
    assert torch.equal(_load_state(folder), _logits(old))


def test_failing_config_write_keeps_the_old_checkpoint(saved_twice, monkeypatch):
    from pathlib import Path

    folder, old, new = saved_twice
    _fail_nth(monkeypatch, Path, "write_text", 1, errno.ENOSPC)
    with pytest.raises(OSError):
        pfk.save_adapters(new, folder)
    assert _files(folder) == sorted([checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, "trainer_state.json"])
    assert torch.equal(_load_state(folder), _logits(old))


def test_crash_between_the_two_renames_is_detected_at_load(saved_twice, monkeypatch):
    """New weights with the old config: refused (the save ids differ), never loaded as a mixed state."""
    folder, old, new = saved_twice
    _fail_nth(monkeypatch, checkpoint.os, "replace", 2, errno.EIO)
    with pytest.raises(OSError):
        pfk.save_adapters(new, folder)
    monkeypatch.undo()
    assert not [n for n in _files(folder) if n.endswith(".tmp")], "temporary files left behind"
    state = _load_state(folder)
    assert isinstance(state, ValueError) and "come from different saves" in str(state)
    pfk.save_adapters(new, folder)  # the next save repairs it
    assert torch.equal(_load_state(folder), _logits(new))
    assert "trainer_state.json" in _files(folder)


def test_reader_during_a_save_sees_old_new_or_an_error(saved_twice, monkeypatch):
    """A concurrent reader between the two renames (simulated by loading at that moment) is refused; before the
    first rename it reads the old checkpoint, after the second the new one."""
    folder, old, new = saved_twice
    seen = []
    real = checkpoint.os.replace

    def replace_and_read(src, dst):
        seen.append(_load_state(folder))
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_and_read)
    pfk.save_adapters(new, folder)
    monkeypatch.undo()
    seen.append(_load_state(folder))
    assert torch.equal(seen[0], _logits(old))
    assert isinstance(seen[1], ValueError) and "different saves" in str(seen[1])
    assert torch.equal(seen[2], _logits(new))


def test_save_into_a_folder_that_cannot_be_created(tmp_path, monkeypatch):
    from pathlib import Path

    _fail_nth(monkeypatch, Path, "mkdir", 1, errno.EROFS)
    with pytest.raises(OSError):
        pfk.save_adapters(_model(), tmp_path / "ro" / "ckpt")
    assert not (tmp_path / "ro").exists()
