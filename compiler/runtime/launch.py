"""Launching `amk_megakernel`: the Params blob, the cubin, and a cooperative launch.

The kernel is `amk_megakernel(const __grid_constant__ Params p, int steps, int pos0, u64 step0)`.
`Params` is a struct of device pointers passed by value; `pack_params` builds its bytes from
`compiler.codegen.params.params_layout`. The cubin is loaded with CuPy (`cupy.RawModule`) and
launched with `cuLaunchCooperativeKernel` through the driver API (ctypes), because the grid's
CTAs wait on each other's counters and must all be resident at once; CuPy's own launcher cannot
pass a struct by value. Each CTA takes the kernel's whole shared-memory plan as dynamic shared
memory (`KernelDims.smem_bytes`; the function's limit is raised to it first) and has
`KernelDims.block_threads` threads (the consumers and the producer warp). Every driver call's
CUresult is checked and a failure raises `LaunchError` naming it (e.g.
CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE).

`CpuLauncher` is the same interface over the CPU schedule interpreter
(`compiler.schedule.interpret`), so the runtime's bookkeeping can be tested without a GPU.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from compiler.ir.fused import FusedGraph
from compiler.runtime.errors import LaunchError, RuntimeUnavailable
from compiler.schedule.schedule import Schedule

__all__ = ["CpuLauncher", "CudaLauncher", "LaunchError", "RuntimeUnavailable", "pack_params"]

KERNEL_NAME = "amk_megakernel"
POINTER_ALIGN = 16

# The CUresults a user is most likely to meet, for when cuGetErrorName itself is unavailable.
CURESULT_NAMES = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    200: "CUDA_ERROR_INVALID_IMAGE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
    300: "CUDA_ERROR_INVALID_SOURCE",
    400: "CUDA_ERROR_INVALID_HANDLE",
    500: "CUDA_ERROR_NOT_FOUND",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    710: "CUDA_ERROR_ASSERT",
    714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    720: "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
    999: "CUDA_ERROR_UNKNOWN",
}


def pack_params(layout: Mapping[str, Any], pointers: Mapping[str, int]) -> bytes:
    """The bytes of `Params`: each field's device pointer at its offset, little-endian.

    Args:
        layout: `params_layout(fg, binding)` (fields with name and offset, and the size).
        pointers: device address per field name; every field must have one.

    Raises:
        ValueError: a field without a pointer, a pointer not 16-byte aligned or null, or a
            pointer for a field the layout does not have.
    """
    blob = bytearray(int(layout["size"]))
    names = {f["name"] for f in layout["fields"]}
    extra = sorted(set(pointers) - names)
    if extra:
        raise ValueError(f"Params has no field {extra[0]!r}")
    for f in layout["fields"]:
        if f["name"] not in pointers:
            raise ValueError(f"Params field {f['name']} has no pointer")
        ptr = int(pointers[f["name"]])
        if ptr == 0 or ptr % POINTER_ALIGN:
            raise ValueError(
                f"Params field {f['name']}: pointer {ptr:#x} is not {POINTER_ALIGN}-byte aligned"
            )
        off = int(f["offset"])
        blob[off : off + 8] = ptr.to_bytes(8, "little")
    return bytes(blob)


class Launcher(Protocol):
    """Runs `steps` decode steps of the kernel over the session's tensors."""

    def launch(
        self,
        tensors: Mapping[str, Tensor],
        tokens_out: Tensor,
        steps: int,
        pos0: int,
        step0: int,
    ) -> None: ...

    def synchronize(self) -> None: ...


class _Driver:
    """The few libcuda entry points we call, with CUresults turned into `LaunchError`."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeUnavailable(f"CUDA driver not found (libcuda.so.1): {e}") from None
        lib = self.lib
        lib.cuLaunchCooperativeKernel.argtypes = [
            ctypes.c_void_p,  # CUfunction
            ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,  # grid
            ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,  # block
            ctypes.c_uint,  # dynamic shared memory bytes
            ctypes.c_void_p,  # CUstream
            ctypes.POINTER(ctypes.c_void_p),  # kernelParams
        ]  # fmt: skip
        lib.cuLaunchCooperativeKernel.restype = ctypes.c_int
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cuStreamSynchronize.restype = ctypes.c_int
        lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
            ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
        ]  # fmt: skip
        lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.restype = ctypes.c_int
        lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.cuFuncSetAttribute.restype = ctypes.c_int
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorName.restype = ctypes.c_int

    def name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
        return CURESULT_NAMES.get(code, "CUresult")

    def check(self, call: str, code: int) -> None:
        if code != 0:
            raise LaunchError(call, code, self.name(code))


CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CudaLauncher:
    """`amk_megakernel` of one cubin, launched cooperatively on the current torch stream.

    Args:
        cubin: the artifact's kernel.<arch>.cubin.
        layout: `params_layout` of the artifact.
        grid: CTAs (the schedule's SM count).
        threads: threads per CTA (`KernelDims.block_threads`).
        smem_bytes: dynamic shared memory per CTA (`KernelDims.smem_bytes`).
        device: CUDA device index.
    """

    def __init__(
        self,
        cubin: Path,
        layout: Mapping[str, Any],
        grid: int,
        threads: int,
        smem_bytes: int,
        device: int,
    ):
        try:
            import cupy
        except ImportError:
            raise RuntimeUnavailable(
                "CuPy is not installed: the GPU runtime needs cupy-cuda13x (pip install amk-farm[gpu])"
            ) from None
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("no CUDA device is visible to PyTorch")
        self.drv = _Driver()
        self.layout, self.grid, self.threads, self.device = layout, grid, threads, device
        self.smem_bytes = smem_bytes
        torch.cuda.set_device(device)
        cupy.cuda.Device(device).use()
        try:
            self.module = cupy.RawModule(path=str(cubin))
            self.function = self.module.get_function(KERNEL_NAME)
        except cupy.cuda.driver.CUDADriverError as e:  # e.g. CUDA_ERROR_NO_BINARY_FOR_GPU
            raise LaunchError(f"loading {cubin.name}", -1, str(e)) from None
        self.handle = ctypes.c_void_p(self._handle(cubin))
        self._packed: tuple[tuple[tuple[str, int], ...], bytes] = ((), b"")
        code = self.drv.lib.cuFuncSetAttribute(
            self.handle, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes
        )
        if code != 0:
            props = torch.cuda.get_device_properties(device)
            limit = getattr(props, "shared_memory_per_block_optin", None)
            raise LaunchError(
                f"{KERNEL_NAME}: {smem_bytes} B of shared memory per CTA exceed this device's "
                + (f"{limit} B " if limit else "")
                + "limit; recompile with fewer --option stages or a smaller stage_bytes",
                code,
                self.drv.name(code),
            )
        per_sm = ctypes.c_int()
        self.drv.check(
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            self.drv.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(per_sm), self.handle, threads, smem_bytes
            ),
        )
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if per_sm.value * sms < grid:
            raise LaunchError(
                f"{KERNEL_NAME}: {grid} CTAs of {threads} threads cannot all be resident "
                f"({per_sm.value} per SM x {sms} SMs); recompile with --sm-count {sms}",
                720,
                "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
            )

    def _handle(self, cubin: Path) -> int:
        """The CUfunction of the kernel: CuPy's `RawKernel.kernel.ptr` (CuPy 13/14) or, where
        CuPy does not expose it, the driver's own cuModuleLoad of the same cubin."""
        for path in (("kernel", "ptr"), ("ptr",)):
            obj: Any = self.function
            try:
                for attr in path:
                    obj = getattr(obj, attr)
                return int(obj)
            except AttributeError:
                continue
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        lib = self.drv.lib
        self.drv.check("cuModuleLoad", lib.cuModuleLoad(ctypes.byref(mod), str(cubin).encode()))
        self.drv.check(
            "cuModuleGetFunction",
            lib.cuModuleGetFunction(ctypes.byref(fn), mod, KERNEL_NAME.encode()),
        )
        assert fn.value is not None
        return fn.value

    def set_pointer(self, symbol: str, address: int) -> None:
        """Store a device address in the module's `__device__` pointer `symbol` (the profile
        build's `amk_prof`)."""
        import cupy

        try:
            mem = self.module.get_global(symbol)
        except cupy.cuda.driver.CUDADriverError as e:
            raise LaunchError(f"{KERNEL_NAME}: no __device__ symbol {symbol}", -1, str(e)) from None
        cupy.ndarray((1,), dtype=cupy.uint64, memptr=mem)[0] = address

    def launch(
        self,
        tensors: Mapping[str, Tensor],
        tokens_out: Tensor,
        steps: int,
        pos0: int,
        step0: int,
    ) -> None:
        """Enqueue one launch of `steps` steps; tokens land in `tokens_out` [steps, B]."""
        pointers = {n: t.data_ptr() for n, t in tensors.items()}
        pointers["tokens_out"] = tokens_out.data_ptr()
        key = tuple(sorted(pointers.items()))
        if key != self._packed[0]:  # the session's tensors rarely move: pack once
            self._packed = (key, pack_params(self.layout, pointers))
        blob = self._packed[1]
        pbuf = ctypes.create_string_buffer(blob, len(blob))
        a_steps, a_pos0, a_step0 = (
            ctypes.c_int(steps),
            ctypes.c_int(pos0),
            ctypes.c_ulonglong(step0),
        )
        args = (ctypes.c_void_p * 4)(
            ctypes.addressof(pbuf),
            ctypes.addressof(a_steps),
            ctypes.addressof(a_pos0),
            ctypes.addressof(a_step0),
        )
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        code = self.drv.lib.cuLaunchCooperativeKernel(
            self.handle, self.grid, 1, 1, self.threads, 1, 1, self.smem_bytes, stream, args
        )
        self.drv.check("cuLaunchCooperativeKernel", code)

    def synchronize(self) -> None:
        """Wait for the stream; a fault inside the kernel surfaces here as a LaunchError."""
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        self.drv.check("cuStreamSynchronize", self.drv.lib.cuStreamSynchronize(stream))


class CpuLauncher:
    """The kernel's contract executed by the CPU schedule interpreter (float64, slow).

    It reads and writes the same tensors a `CudaLauncher` would (by Params field name), so a
    `Session` on the CPU exercises the runtime's bookkeeping (prefill hand-off, positions,
    tokens_out slices, multi-token launches) without a GPU.
    """

    def __init__(self, fused: FusedGraph, schedule: Schedule, layout: Mapping[str, Any]):
        self.fused, self.schedule = fused, schedule
        self.binds = {f["name"]: f["binds"] for f in layout["fields"]}
        self.weights = [f["name"] for f in layout["fields"] if f["role"] == "weight"]

    def launch(
        self,
        tensors: Mapping[str, Tensor],
        tokens_out: Tensor,
        steps: int,
        pos0: int,
        step0: int,
    ) -> None:
        from compiler.schedule.interpret import interpret

        weights = {self.binds[n]: tensors[n].double() for n in self.weights}
        caches = {self.binds[n]: t.double() for n, t in tensors.items() if n.endswith("_cache")}
        r = interpret(
            self.schedule,
            self.fused,
            weights,
            tensors["token"].clone(),
            pos0,
            steps,
            order="program",
            caches=caches,
            check=False,
        )
        tokens_out[:steps].copy_(torch.from_numpy(r.tokens))
        tensors["token"].copy_(torch.from_numpy(r.tokens[-1]))
        tensors["logits"].copy_(torch.from_numpy(r.logits[-1]))
        by_bind = {b: n for n, b in self.binds.items()}
        for name, value in r.caches.items():
            tensors[by_bind[name]].copy_(torch.from_numpy(value))

    def synchronize(self) -> None:
        pass
