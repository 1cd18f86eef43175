"""
Memory, measured: the allocator's peak on CUDA; on CPU the process's peak resident set (Linux VmHWM, reset before a
run once the heap's free pages are back with the OS) and, to say what a GPU would hold, the bytes of live tensors
tracked op by op (LiveTensors) and the bytes autograd keeps for the backward pass (SavedTensors).

    with memory.LiveTensors() as live:      # any device: peak bytes of the tensors the ops inside create
        loss.backward()
    print(live.peak)
"""
import ctypes
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def reset_resident_peak():
    """Reset this process's peak resident set (Linux: /proc/self/clear_refs); False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def glibc():
    """The C library, for malloc_trim (glibc), or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = glibc()


def reset_peak(device):
    """Start a peak measurement (peak() reads it)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    if LIBC is not None:  # hand the heap's free pages back to the OS: the peak counts what the run touches
        LIBC.malloc_trim(0)
    reset_resident_peak()


def resident(field):
    """A line of /proc/self/status in bytes: VmHWM (the peak resident set), VmRSS (the resident set now)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak(device):
    """Bytes at the peak since reset_peak: CUDA allocated (weights included); CPU resident (VmHWM)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resident("VmHWM")


def now(device):
    """Bytes held now: CUDA allocated; CPU resident (VmRSS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resident("VmRSS")


class LiveTensors(TorchDispatchMode):
    """Inside: the bytes of the tensor storages that the ops run inside create, while they are alive; `now` and
    `peak` (the most alive at once). What existed before (weights, inputs) is not counted: add it. Each storage counts
    once, however many views share it; a storage is freed when its last view dies. On CUDA this is the allocator's
    view without its rounding and caching; on CPU it is what a GPU would hold, which the resident set is not (it also
    counts the allocator's free pages, kernel workspaces and pages touched while loading)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = {}  # storage key -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a view or an in-place result shares an input's storage: nothing allocated
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage()._cdata not in inputs:
                self.track(t.untyped_storage())
        return out

    def track(self, storage):
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self.free, key)  # NOTE: a storage's Python object lives as long as the storage

    def free(self, key):
        self.now -= self.live.pop(key, 0)


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Inside: the bytes autograd keeps for the backward pass (each storage once), counted as they are saved, of the
    tensors created inside `live` (a LiveTensors entered first: the weights autograd keeps are not activations).
    Inside an activation-checkpointed region only its inputs are kept, and they are not seen here."""

    def __init__(self, live):
        self.bytes, self.seen, self.created = 0, set(), live.live
        super().__init__(self.pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self

    def pack(self, t):
        storage = t.untyped_storage()
        if storage._cdata not in self.seen and storage._cdata in self.created:
            self.seen.add(storage._cdata)
            self.bytes += storage.nbytes()
        return t
