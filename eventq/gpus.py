"""The local GPU inventory: NVML where a driver exists, else none, or a simulated one."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from eventq.events import GpuInfo


@dataclass(frozen=True)
class Inventory:
    """What a node has; ``simulated`` is shown wherever the inventory is shown."""

    gpus: list[GpuInfo]
    simulated: bool
    nvml_error: str | None = None
    #: The operator said there are none (``--gpus 0``): NVML is not read, now or later.
    declared_none: bool = False

    @property
    def backend(self) -> str:
        if self.simulated:
            return "simulated"
        return "cuda" if self.gpus else "none"

    @property
    def reads_nvml(self) -> bool:
        """Read from a working NVML, and so worth reading again as GPUs fill up."""
        return not self.simulated and not self.declared_none and self.nvml_error is None


_SPEC = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z0-9_.+-]+?)(?:-(\d+(?:\.\d+)?)GB)?\s*$")


class InventorySpecError(ValueError):
    pass


def simulated(spec: str) -> Inventory:
    """Parse ``4xA100-80GB`` (or ``2xA100-80GB,2xL4-24GB``) into a simulated inventory."""
    gpus: list[GpuInfo] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = _SPEC.match(part)
        if match is None:
            raise InventorySpecError(
                f"cannot read GPU spec {part!r}; expected COUNTxNAME[-MEMGB], e.g. 4xA100-80GB")
        count, name, memory = int(match[1]), match[2], float(match[3] or 80)
        first = len(gpus)
        gpus.extend(GpuInfo(index=first + i, name=name, memory_gb=memory) for i in range(count))
    return Inventory(gpus=gpus, simulated=True)


def from_nvml() -> Inventory:
    """Read the GPUs through NVML; without a driver, zero GPUs and the reason."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        return Inventory(gpus=[], simulated=False, nvml_error=f"NVML unavailable: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Inventory(gpus=[], simulated=False, nvml_error=f"NVML unavailable: {exc}")
    try:
        return Inventory(gpus=[_read_device(pynvml, i)
                               for i in range(pynvml.nvmlDeviceGetCount())], simulated=False)
    except pynvml.NVMLError as exc:
        return Inventory(gpus=[], simulated=False, nvml_error=f"NVML error: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_device(pynvml: object, index: int) -> GpuInfo:
    nvml = pynvml
    handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
    name = nvml.nvmlDeviceGetName(handle)  # type: ignore[attr-defined]
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
    used_percent = 100.0 * memory.used / memory.total if memory.total else 0.0
    return GpuInfo(index=index, name=name if isinstance(name, str) else name.decode(),
                   memory_gb=round(memory.total / 2**30, 1),
                   foreign_memory_percent=round(used_percent, 1))


#: ``--gpus 0``: no local GPUs, whatever the machine has; its jobs run with ``gpus: 0``.
NONE = "0"


def allocated(inventory: Inventory, indices: tuple[int, ...] | None) -> Inventory:
    """Only the GPUs a batch system allocated, when NVML sees more of the node than that (a
    node whose devices the job is not fenced from); all it sees otherwise."""
    if indices is None or inventory.simulated or len(inventory.gpus) <= len(indices):
        return inventory
    wanted = set(indices)
    return Inventory([g for g in inventory.gpus if g.index in wanted], False,
                     inventory.nvml_error)


def detect(spec: str | None) -> Inventory:
    """No GPUs for ``0``, the simulated inventory for another spec, else NVML."""
    if spec is not None and spec.strip() == NONE:
        return Inventory(gpus=[], simulated=False, declared_none=True)
    return simulated(spec) if spec else from_nvml()
