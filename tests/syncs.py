"""Counting what would stall a GPU in a training step, on any device (tests/test_fastpath.py, tests/test_gpu.py).

:class:`SyncCounter` records, per training batch, from the method's ``on_after_batch_transfer`` (views) to the end of
its ``on_train_batch_end`` (after every callback's batch hooks): reads of a tensor's value on the host (``item``,
``bool``, ``int``, ``float``: ``aten._local_scalar_dense``; ``tolist``), tensors made from Python data
(``aten.lift_fresh``: a host-to-device copy on a GPU), ops whose output size depends on the data (``nonzero``, boolean
indexing, ``masked_select``, ``unique``) and reduces of a decision or a tensor over the ranks. On a CPU none of these
costs anything, but each is a host-device sync on a GPU; counting them shows where a GPU step would wait.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default}


class _Mode(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            self.record("item")
        elif func is aten.lift_fresh.default:
            self.record("tensor from Python data")
        elif func in DATA_DEPENDENT or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                                        and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``events[k]``: what would sync in training batch ``k`` (0-based over the run). Wraps ``method``'s
    ``on_after_batch_transfer`` and ``on_train_batch_end`` and ``trainer``'s strategy reduces; call
    :meth:`attach` after the trainer is built, before ``fit``. ``during`` (optional): a context-manager factory
    entered around each batch's window as well (e.g. CUDA's sync debug mode), given the batch number."""

    def __init__(self, during: Callable[[int], object] | None = None):
        self.events: dict[int, list[str]] = defaultdict(list)
        self.batch = -1
        self._mode: _Mode | None = None
        self._during = during
        self._ctx = None

    def _record(self, what: str) -> None:
        if self._mode is not None:
            self.events[self.batch].append(what)

    def attach(self, method, trainer) -> None:
        transfer, batch_end = method.on_after_batch_transfer, method.on_train_batch_end

        def on_after_batch_transfer(batch, dataloader_idx):
            if not method.trainer.training:
                return transfer(batch, dataloader_idx)
            self.batch += 1
            self._mode = _Mode(self._record)
            self._mode.__enter__()
            if self._during is not None:
                self._ctx = self._during(self.batch)
                self._ctx.__enter__()
            return transfer(batch, dataloader_idx)

        def on_train_batch_end(*args, **kwargs):
            try:
                return batch_end(*args, **kwargs)
            finally:
                if self._ctx is not None:
                    self._ctx.__exit__(None, None, None)
                    self._ctx = None
                if self._mode is not None:
                    self._mode.__exit__(None, None, None)
                    self._mode = None

        method.on_after_batch_transfer, method.on_train_batch_end = on_after_batch_transfer, on_train_batch_end
        strategy = trainer.strategy
        for name in ("reduce", "reduce_boolean_decision"):
            original = getattr(strategy, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self._record(_name)
                return _original(*args, **kwargs)

            setattr(strategy, name, counted)
        tolist = torch.Tensor.tolist
        counter = self

        def counted_tolist(tensor, *args, **kwargs):
            counter._record("tolist")
            return tolist(tensor, *args, **kwargs)

        self._tolist = tolist
        torch.Tensor.tolist = counted_tolist

    def detach(self) -> None:
        """Undo the patches (also after a step that raised inside the window)."""
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
        self._ctx = self._mode = None
        torch.Tensor.tolist = self._tolist
