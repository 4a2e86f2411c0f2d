"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets that
overlap with backward. Everything but the wrapping and the skipped sync on non-final
micro-steps is `SingleDevice`, including the checkpoint (identical on every rank, so it resumes
on any number of ranks). Memory per rank is that of one device: DDP buys time, not space."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shoestring.levers.lora import is_nf4
from shoestring.parallel.cost import Collective, Cost, Workload
from shoestring.parallel.single import SingleDevice


class DDP(SingleDevice):
    def wrap(self, module: nn.Module) -> nn.Module:
        # DDP's start-up broadcast would round-trip an NF4 weight (QLoRA) through a plain tensor
        # and quantise it again; every rank quantised the same weights identically already.
        quantised = [name for name, p in module.named_parameters() if is_nf4(p)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, quantised)
        self.ddp = DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.options.bucket_cap_mb,
            gradient_as_bucket_view=self.options.gradient_as_bucket_view,
            # The model's only buffers are RoPE tables, computed identically on every rank:
            # syncing them before each forward would be pure traffic.
            forward_sync_buffers=False,
        )
        self.rank, self.world_size = self.ddp.process_group.rank(), self.ddp.process_group.size()
        return self.ddp

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    @classmethod
    def cost(cls, w: Workload) -> Cost:
        """A replica's state; every gradient all-reduced once a step over the world, in buckets
        of `bucket_cap_mb` (one reducing while the next fills: two buckets of fp32 gradients)."""
        single = super().cost(w)
        if w.world == 1:
            return single
        grads = cls.weight_dtype(w.policy).itemsize * w.n_params
        bucket = int(w.options.bucket_cap_mb * 2**20)
        reduce = Collective("all_reduce", grads, -(-grads // bucket), "world", "gradients")
        return replace(single, buffers={"comm_buckets": min(2 * bucket, 4 * w.n_params)}, collectives=(reduce,), overlap=0.8)
