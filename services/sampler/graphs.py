"""The decode step captured as CUDA graphs: one per (batch bucket, context bucket, adapter slots).

The decode step is the same ``Qwen3Decoder.forward`` + ``logits`` the engine runs eagerly on CPU;
here its inputs live in static device buffers sized for the largest batch and context, each step
copies the real inputs into their leading rows, and the graph of the smallest bucket that fits
is replayed (captured on first use). Padded rows decode token 0 at position 0 into the scratch
block 0 with a context of one token; their logits are dropped. Batch buckets are powers of two;
context buckets are multiples of ``BLOCKS_PER_BUCKET`` blocks, so attention reads at most that
many blocks of padding per row.

With ``compiled`` (the default) the layer bodies run through ``Qwen3Decoder.decode_fns``
(``torch.compile``d, one compilation per batch bucket and LoRA on/off, done by the warm-up runs
before capture), so each graph replays a few fused kernels per layer instead of dozens of small
element-wise ones; attention and the KV writes stay outside the compiled code.

LoRA: each row's slot per rank class (``weights.AdapterSlots``) is a static input too; the key
holds how many slots of each class the batch reads (and which projections), so a batch of
other adapters in the same slots replays the same graph. A graph records tensor addresses:
allocating new slot stacks (a first adapter of a rank class or projection) must drop this
object, which the engine does; copying an adapter into a slot needs nothing.
"""

from __future__ import annotations

import torch

from services.sampler.kvcache import PagedKVCache
from services.sampler.model import DecodeBatch, Qwen3Decoder
from services.sampler.weights import AdapterSlots, DecodeRows

BLOCKS_PER_BUCKET = 4


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen3Decoder,
        cache: PagedKVCache,
        adapters: AdapterSlots,
        max_batch: int,
        max_blocks: int,
        kernel: str = "sdpa",
        compiled: bool = True,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.kernel = kernel
        self.compiled = compiled
        self.cache = cache
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        dev = cache.k.device
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.table = torch.zeros(max_batch, max_blocks, dtype=torch.long, device=dev)
        self.context = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.row_slots: dict[int, torch.Tensor] = {}  # per rank class: each row's adapter slot
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[object, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        table: torch.Tensor,
        context: torch.Tensor,
        lora: DecodeRows | None,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step (the same values the eager step computes)."""
        b, n = table.shape
        batch = min(self.max_batch, 1 << (b - 1).bit_length())
        blocks = min(self.max_blocks, -(-n // BLOCKS_PER_BUCKET) * BLOCKS_PER_BUCKET)
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(slots)
        self.context[:b].copy_(context)
        self.table[:batch, :blocks].zero_()
        self.table[:b, :n].copy_(table)
        if b < batch:  # padding rows: scratch block, one token of context
            self.ids[b:batch].zero_()
            self.positions[b:batch].zero_()
            self.slots[b:batch].zero_()
            self.context[b:batch].fill_(1)
        if lora is not None:
            for rank, row_slots in lora.slots.items():
                buf = self.row_slots.get(rank)
                if buf is None:
                    buf = self.row_slots[rank] = torch.full_like(self.ids, -1)
                staged = torch.tensor(row_slots).pin_memory()  # no wait for the device
                buf[:b].copy_(staged, non_blocking=True)
                buf[b:batch].fill_(-1)
        key = (batch, blocks, lora.key if lora is not None else ())
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, blocks, lora)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:b]

    def _step(self, batch: int, blocks: int, rows: DecodeRows | None) -> torch.Tensor:
        # A contiguous copy of the table's slice: with a strided index tensor the KV gather can
        # leave the vectorised gather kernel for a slow element-wise one.
        table = self.table[:batch, :blocks].contiguous()
        decode = DecodeBatch(self.slots[:batch], table, self.context[:batch], self.kernel)
        lora = None
        if rows is not None:
            slots = {rank: self.row_slots[rank][:batch] for rank in rows.slots}
            lora = self.adapters.model_lora(rows, slots)
        hidden = self.model.forward(
            self.ids[:batch], self.positions[:batch], self.cache, decode, lora, self.compiled
        )
        return self.model.logits(hidden, lora, self.compiled)

    def _capture(
        self, batch: int, blocks: int, lora: DecodeRows | None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up runs (which also compile) write this step's real keys and values to their
        # real slots, which the replay then writes again: harmless.
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, blocks, lora)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(batch, blocks, lora)
        return graph, logits
