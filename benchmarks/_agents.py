"""Two NIXL agents in this process for the benchmarks' raw WRITEs (UCX, DRAM, no progress thread)."""

from __future__ import annotations

from typing import Any

import torch


def local_pair(nbytes: int, prefix: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """Agents ``{prefix}-a`` and ``{prefix}-b``, a's ``nbytes`` of ones and b's of zeros registered,
    b known to a: ``a.initialize_xfer("WRITE", ..., f"{prefix}-b")`` writes a's bytes into b's."""
    from nixl._api import nixl_agent, nixl_agent_config

    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    a = nixl_agent(f"{prefix}-a", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    b = nixl_agent(f"{prefix}-b", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    a.register_memory(src)
    b.register_memory(dst)
    a.add_remote_agent(b.get_agent_metadata())
    return a, b, src, dst
