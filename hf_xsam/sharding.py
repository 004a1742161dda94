"""Parameters sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): DTensors whose local tensors are this
rank's shards. XSAM works on the local shards directly (no DTensor dispatch, no gather of full parameters), so
theta_0 is sharded like the parameters, and reduces only what must be global: the squared norms (one all-reduce
per norm computation) and, like under DDP, the probe's losses."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed tensors: nothing can be sharded
        return None
    return DTensor


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local shard (a view: writing to it writes the parameter); plain tensors as they are."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def like(local_tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this rank's shard) as a tensor laid out like ``param``: a DTensor sharing its storage when
    ``param`` is one (so that distributed checkpoints save it sharded), else the tensor itself."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return local_tensor
    return dtensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def shard_groups(params: list[torch.Tensor]) -> tuple:
    """The process groups over which the parameters are sharded: a norm's local sum of squares is summed over
    them (replicated mesh dimensions, as in HSDP, hold copies and are left out). Empty for plain parameters.

    Raises ValueError when only some parameters are sharded, or not alike: their global norm would need to count
    the plain ones once and the sharded ones across ranks (shard the root module with ``fully_shard``)."""
    dtensor = _dtensor_type()
    layouts = {(p.device_mesh, tuple(p.placements)) if dtensor is not None and isinstance(p, dtensor) else None
               for p in params}
    if layouts == {None}:
        return ()
    if len(layouts) > 1:
        raise ValueError(
            "XSAM found parameters sharded in different ways (or some sharded and some not); its norms span "
            "every parameter, so they must be sharded alike: apply fully_shard to the root module too")
    mesh, placements = next(iter(layouts))
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard())


def sum_over(tensor: torch.Tensor, groups: tuple) -> torch.Tensor:
    """All-reduce (sum) ``tensor`` in place over each of ``groups``."""
    for group in groups:
        dist.all_reduce(tensor, group=group)
    return tensor
