"""The sampler's paged KV cache: preallocated blocks, a refcounted allocator, block tables.

Keys and values of every layer live in two tensors ``[layers, blocks, block_size, kv_heads,
head_dim]`` allocated once. A sequence owns a list of block ids (its block table); token ``p`` of
a sequence lives in slot ``blocks[p // block_size] * block_size + p % block_size``. Blocks are
refcounted so that the samples of one request share their prompt's full blocks (prefill once,
fork); a partly filled block is copied on fork, since each sample appends its own tokens to it.
Block 0 is scratch, never handed out: padded rows of a CUDA-graphed step write there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int


class BlockAllocator:
    """Free list and refcounts over blocks ``1 .. num_blocks - 1`` (pure Python)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache out of blocks (the engine's reservation is wrong)")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        assert self._refs[block] > 0, f"block {block} is not allocated"
        self._refs[block] += 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            assert self._refs[block] > 0, f"block {block} released twice"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]


class PagedKVCache:
    """The preallocated K and V tensors and the three operations the decoder needs."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        size = (shape.layers, shape.num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.allocator = BlockAllocator(shape.num_blocks)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` (``[T, KVH, hd]``) at flat slots ``[T]``."""
        s = self.shape
        self.k[layer].view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, v)

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, n_blocks * block_size, KVH, hd]`` of block tables ``[B, n]``."""
        s = self.shape
        b, n = block_table.shape
        k = self.k[layer][block_table].view(b, n * s.block_size, s.kv_heads, s.head_dim)
        v = self.v[layer][block_table].view(b, n * s.block_size, s.kv_heads, s.head_dim)
        return k, v

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def fork(self, blocks: list[int], length: int) -> list[int]:
        """A new block table for a sequence that continues ``blocks`` (holding ``length``
        tokens): full blocks shared, the partly filled last one copied."""
        full = length // self.shape.block_size
        table = [self.allocator.share(b) for b in blocks[:full]]
        if length % self.shape.block_size:
            fresh = self.allocator.allocate()
            self.copy_block(blocks[full], fresh)
            table.append(fresh)
        return table

    def slots(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Flat slots of positions ``[start, stop)`` of a sequence with table ``blocks``."""
        bs = self.shape.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]
