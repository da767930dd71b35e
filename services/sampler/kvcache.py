"""The sampler's paged KV cache: preallocated blocks, a refcounted allocator, block tables.

Keys and values of every layer live in two tensors ``[layers, blocks, block_size, kv_heads,
head_dim]`` allocated once. A sequence owns a list of block ids (its block table); token ``p`` of
a sequence lives in slot ``blocks[p // block_size] * block_size + p % block_size``. Blocks are
refcounted so that the samples of one request share their prompt's full blocks (prefill once,
fork); a partly filled block is copied on fork, since each sample appends its own tokens to it.
Block 0 is scratch, never handed out: padded rows of a CUDA-graphed step write there.

``PrefixCache`` keeps full prompt blocks for later requests with the same weights and prompt
prefix (repeated prompts, multi-turn conversations, GRPO groups sent as separate requests).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
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


class PrefixCache:
    """Full prompt blocks kept for later requests: keyed by the sampler weights and every token up
    to the block's end, least recently used evicted past ``max_blocks``.

    A block's key chains its parent's (``blake2b(parent | weights | tokens)``), so a lookup walks
    a prompt's full blocks from the start and stops at the first miss; a hit shares the block
    (refcount + 1) and the request prefills only what follows. The cache holds one reference on
    every block it lists; a block no sequence uses any more is *idle* (refcount 1) and is what
    eviction frees. Lookups touch a chain from its end back to its root, so a root is never
    older than its descendants and eviction takes leaves first.
    """

    def __init__(self, cache: PagedKVCache, max_blocks: int) -> None:
        self._cache = cache
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # key -> block, oldest first
        self.hit_tokens = 0  # prompt tokens served from the cache, over the cache's life

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, weights: str, prompt: list[int]) -> list[bytes]:
        """The chain keys of the prompt's full blocks."""
        bs = self._cache.shape.block_size
        ids = np.asarray(prompt, dtype="<i8")
        out: list[bytes] = []
        parent = weights.encode()
        for i in range(len(prompt) // bs):
            parent = hashlib.blake2b(
                parent + ids[i * bs : (i + 1) * bs].tobytes(), digest_size=16
            ).digest()
            out.append(parent)
        return out

    def lookup(self, keys: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of ``keys``, each shared for the caller."""
        if self.max_blocks <= 0:
            return []
        hits: list[int] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            hits.append(self._cache.allocator.share(block))
        self._touch(keys[: len(hits)])
        self.hit_tokens += len(hits) * self._cache.shape.block_size
        return hits

    def insert(self, keys: list[bytes], blocks: list[int]) -> None:
        """List the full blocks ``blocks[: len(keys)]`` under ``keys`` (those not listed yet)."""
        if self.max_blocks <= 0:
            return
        for key, block in zip(keys, blocks, strict=False):
            if key not in self._blocks:
                self._blocks[key] = self._cache.allocator.share(block)
        self._touch(keys)
        while len(self._blocks) > self.max_blocks:
            _, block = self._blocks.popitem(last=False)
            self._cache.allocator.release([block])

    def idle(self) -> int:
        """Blocks only the cache holds."""
        refs = self._cache.allocator.refs
        return sum(1 for block in self._blocks.values() if refs(block) == 1)

    def evict_idle(self, count: int) -> int:
        """Free up to ``count`` idle blocks, least recently used first; how many were freed."""
        refs = self._cache.allocator.refs
        idle = [k for k, block in self._blocks.items() if refs(block) == 1][:count]
        for key in idle:
            self._cache.allocator.release([self._blocks.pop(key)])
        return len(idle)

    def clear(self) -> None:
        """Forget every block (the allocator is being reset: nothing is released)."""
        self._blocks.clear()

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
