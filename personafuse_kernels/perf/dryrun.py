"""Dry runs: the real launchers (or any torch code) on meta tensors, with every kernel they would launch recorded.

Two recorders, one list:
- Triton: each @triton.jit kernel object of the package's kernel modules is swapped for a recorder whose
  `kernel[grid](...)` notes the kernel, its grid, its bound arguments (meta tensors: shapes and dtypes) and its
  constexprs, and launches nothing (or, with passthrough=True, then launches the real kernel: the tests' real runs
  in Triton's interpreter go through the same recorder);
- torch: a TorchDispatchMode notes every aten op that runs a kernel (GEMMs, copies, elementwise, reductions,
  fills) and skips the ones that only make views or allocate. It notes the CUDA extension's ops too (source
  "cuda", arguments bound by their schema names): on meta tensors they run their fake implementations
  (ops/cuda_fakes.py), and perf/cuda_launches.py expands each into the kernels its C++ launcher starts.
The launchers see the simulated card (ops.launch_configs.simulate_card), so they pick that card's production
configs, grids and splits, whatever device the tensors are on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.launch_configs import simulate_card
from .cards import Card


@dataclass
class Launch:
    """One kernel launch. source: "triton", "aten" or "cuda" (an op of the CUDA extension, which may launch more
    than one kernel); name: the kernel (or op); grid: Triton's grid (programs per axis), () otherwise; args:
    argument name -> value (tensors as meta or real tensors; aten ops and extension ops add "outputs"); options:
    num_warps, num_stages and the constexprs (Triton)."""
    source: str
    name: str
    grid: tuple = ()
    args: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


# aten ops that allocate, reshape or alias (no kernel), or only read metadata
_NO_KERNEL = {
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "permute", "t", "transpose", "expand", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "slice",
    "select", "split", "split_with_sizes", "unbind", "lift_fresh", "_reshape_alias", "view_as", "numpy_T",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense",
    "set_", "resize_", "contiguous_view", "diagonal", "narrow", "expand_as", "item", "dim", "size", "stride",
}


class Recording(list):
    """The launches of a dry run, in order; .allocations names the aten op behind each new tensor storage the run
    created (per-call allocations: outputs, workspaces, zero-filled buffers)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[str] = []


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, launches: Recording):
        super().__init__()
        self.launches = launches
        self.seen: set[int] = set()
        self.alive: list = []  # the storages seen, kept alive so that a freed one's id is never reused meanwhile

    def _see(self, t: torch.Tensor) -> bool:
        """Note t's storage; True when it had not been seen (a new allocation)."""
        storage = t.untyped_storage()
        if storage._cdata in self.seen:
            return False
        self.seen.add(storage._cdata)
        self.alive.append(storage)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _flat(list(args) + list(kwargs.values())):
            if isinstance(t, torch.Tensor):
                self._see(t)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.namespace.startswith("personafuse"):  # an extension op: its kernels are expanded by the cost model
            for t in _flat([out]):
                if isinstance(t, torch.Tensor) and self._see(t):
                    self.launches.allocations.append(name)
            bound = {arg.name: value for arg, value in zip(func._schema.arguments, args)}
            outputs = [t for t in _flat([out]) if isinstance(t, torch.Tensor)]
            self.launches.append(Launch("cuda", name, (), dict(bound, **kwargs, outputs=outputs)))
            return out
        for t in _flat([out]):
            if isinstance(t, torch.Tensor) and self._see(t):
                self.launches.allocations.append(name)
        if name.endswith("_") and name not in ("copy_", "zero_", "fill_", "add_", "mul_", "addmm_", "index_put_"):
            base = name.rstrip("_")
        else:
            base = name
        if base not in _NO_KERNEL and not (base == "contiguous"):
            if base in ("copy_", "clone", "_to_copy", "contiguous") and _is_noop_copy(func, args, kwargs):
                return out
            tensors_in = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
            tensors_out = [t for t in _flat([out]) if isinstance(t, torch.Tensor)]
            self.launches.append(Launch("aten", name, (), {"inputs": tensors_in, "outputs": tensors_out,
                                                           "scalars": [a for a in _flat(args)
                                                                       if isinstance(a, (int, float, bool))]}))
        return out


def _is_noop_copy(func, args, kwargs) -> bool:
    """A _to_copy to the same dtype and layout of a contiguous tensor still copies; nothing here is a no-op but the
    copy of a tensor onto itself."""
    return func.overloadpacket.__name__ == "copy_" and len(args) >= 2 and args[0] is args[1]


def _flat(items) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flat(item))
        else:
            out.append(item)
    return out


class _TritonRecorder:
    """Stands in for one @triton.jit kernel: `recorder[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches: list, passthrough: bool):
        self.kernel = kernel
        self.launches = launches
        self.passthrough = passthrough
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.arg_names, args))
            options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
            constexprs = {k: v for k, v in kwargs.items() if k in self.arg_names}
            g = grid(dict(bound, **constexprs)) if callable(grid) else tuple(grid)
            self.launches.append(Launch("triton", self.kernel.fn.__name__, tuple(int(v) for v in g),
                                        dict(bound, **constexprs), options))
            if self.passthrough:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch


def _kernel_modules() -> list:
    """Every module that holds (or imported by name) the package's Triton kernels."""
    from ..ops import (
        router_triton,
        routing_triton,
        triton_grouped_kernels,
        triton_kernels,
        triton_router_kernels,
        triton_routing_kernels,
    )

    return [triton_kernels, triton_grouped_kernels, triton_router_kernels, router_triton, triton_routing_kernels,
            routing_triton]


@contextlib.contextmanager
def record_triton(launches: list, passthrough: bool = False):
    """Swap every Triton kernel of the package for a recorder (restored on exit)."""
    swapped = []
    for mod in _kernel_modules():
        for name, obj in list(vars(mod).items()):
            # a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction: both have fn and arg_names
            if name.endswith("_kernel") and hasattr(obj, "arg_names") and hasattr(obj, "fn"):
                swapped.append((mod, name, obj))
                setattr(mod, name, _TritonRecorder(obj, launches, passthrough))
    try:
        yield
    finally:
        for mod, name, obj in swapped:
            setattr(mod, name, obj)


@contextlib.contextmanager
def recording(card: Card | None, *, triton: bool = True, aten: bool = True, passthrough: bool = False):
    """Yields a Recording that fills with the launches of whatever runs inside: Triton kernels (if triton) and aten
    ops (if aten, which also counts the allocations), with the launchers choosing as on `card` (None: as on this
    machine)."""
    launches = Recording()
    with contextlib.ExitStack() as stack:
        if card is not None:
            stack.enter_context(simulate_card(card.device_name, card.sms))
        if triton:
            stack.enter_context(record_triton(launches, passthrough))
        if aten:
            stack.enter_context(_AtenRecorder(launches))
        yield launches
