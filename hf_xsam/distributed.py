"""Collectives across processes (DDP, or any loop that keeps replicas in step), outside the pass driver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist


def mean_over_processes() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Under torch.distributed with several processes, a function averaging a small tensor (the probe's losses)
    over the default group, so that every rank picks the same alpha; None otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None

    def mean(losses: torch.Tensor) -> torch.Tensor:
        losses = losses.clone()
        dist.all_reduce(losses)
        return losses / world

    return mean


def all_reduce_mean(tensors: list[torch.Tensor], bucket_bytes: int = 25 * 2**20) -> None:
    """Average tensors across processes in place: flattened into ~25 MiB buckets, one all-reduce each."""
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, t in enumerate(tensors):
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes or i == len(tensors) - 1:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            for t_out, t_in in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t_out.copy_(t_in)
            bucket, size = [], 0


def trainer_no_sync(trainer, model) -> contextlib.AbstractContextManager:
    """Hold back a backward's gradient reduction, as the Trainer's loop does for a micro-batch that does not end
    the step: FSDP2's own switch for a model Transformers sharded at load time, Accelerate's ``no_sync`` otherwise."""
    from transformers.distributed.fsdp import is_fsdp_managed_module

    if trainer.is_distributed_loading_by_transformers and is_fsdp_managed_module(trainer.model):
        return trainer._defer_fsdp_gradient_reduction()
    return trainer.accelerator.no_sync(model)
