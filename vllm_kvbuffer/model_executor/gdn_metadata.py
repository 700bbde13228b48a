"""vLLM's GDN attention metadata, plus where each row stands in its request.

KVBuffer commits a verify's accepted tokens from positions (:mod:`.gdn_core`, "Commits come from
positions"): it needs, per row, the number of tokens the request had computed before this step
(``seq_len - query_len``), and in align mode the block that holds the state at the last block
boundary. vLLM's ``GDNAttentionMetadata`` does not carry them, so the promoted layers name their
own attention backend (``get_attn_backend``), the documented way a layer picks its metadata, as
vLLM's own Kimi-K3 KDA layer does: the builder is vLLM's, and its result gains
``context_lens`` and the boundary fields. Nothing else changes, so every runner path that
``isinstance``-checks vLLM's builder (the accepted-token and draft-count arguments) still applies.

Under FULL CUDA graphs the captured step reads these through persistent buffers that ``build``
refills before every replay, as vLLM's builder does for its own fields. The boundary blocks are
per KV-cache group; vLLM reuses one group's metadata for another (``update_block_table``) only
for its own builder class (``supports_update_block_table`` checks the exact type), so every GDN
group builds its own.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.gdn_attn import (
    GDNAttentionBackend,
    GDNAttentionMetadata,
    GDNAttentionMetadataBuilder,
)

from .gdn_core import RowPositions


@dataclasses.dataclass
class KVBufferGDNAttentionMetadata(GDNAttentionMetadata):
    """vLLM's metadata plus, per request of the batch (batch order, ``[num_reqs]``, device):

    - ``context_lens``: tokens computed before this step's first token;
    - ``boundary_pos`` / ``boundary_blocks`` (align mode with drafts only): the first multiple of
      the block size above ``context_lens``, and the block id that caches the state there
      (0, vLLM's null block: none).
    """

    context_lens: torch.Tensor | None = None
    boundary_pos: torch.Tensor | None = None
    boundary_blocks: torch.Tensor | None = None

    def _positions(self, index) -> RowPositions:
        return RowPositions(self.context_lens, self.boundary_pos,
                            self.boundary_blocks).rows(index)

    def spec_positions(self, rows: int) -> RowPositions:
        """Positions of the speculative rows (the first ``rows`` of a speculative-only batch)."""
        if self.num_prefills == 0 and self.num_decodes == 0:
            return self._positions(slice(0, rows))
        return self._positions(self.spec_sequence_masks_cpu)

    def non_spec_positions(self) -> RowPositions:
        """Positions of the decode and prefill rows, in the order of
        ``non_spec_state_indices_tensor``."""
        if self.spec_sequence_masks_cpu is None:
            return self._positions(slice(0, self.context_lens.shape[0]))
        return self._positions(~self.spec_sequence_masks_cpu)


class KVBufferGDNAttentionMetadataBuilder(GDNAttentionMetadataBuilder):
    """vLLM's GDN builder; its metadata also says where each row stands (module docstring)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        rows = max(vllm_config.scheduler_config.max_num_seqs, self.decode_cudagraph_max_bs)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self._align = (vllm_config.cache_config.mamba_cache_mode == "align"
                       and self.use_spec_decode)
        if self._align:
            if self.kv_cache_spec.block_size < self.num_spec + 1:
                # A verify then reaches at most one block boundary (gdn_core.snapshot_boundaries).
                raise ValueError(
                    f"KVBuffer: prefix caching with {self.num_spec} draft tokens needs a Mamba "
                    f"block size >= {self.num_spec + 1}, got {self.kv_cache_spec.block_size}; "
                    "pass fewer --num-speculative-tokens or --no-enable-prefix-caching")
            self.boundary_pos = torch.zeros(rows, dtype=torch.int32, device=device)
            self.boundary_blocks = torch.zeros(rows, dtype=torch.int32, device=device)

    def build(self, common_prefix_len, common_attn_metadata, num_accepted_tokens=None,
              num_decode_draft_tokens_cpu=None, fast_build=False):
        m = super().build(common_prefix_len, common_attn_metadata, num_accepted_tokens,
                          num_decode_draft_tokens_cpu, fast_build)
        c = common_attn_metadata
        n = c.num_reqs
        ctx = self.context_lens[:n]
        ctx.copy_(c.compute_num_computed_tokens()[:n])
        extra = dict(context_lens=ctx)
        if self._align:
            bs = self.kv_cache_spec.block_size
            # The next boundary above the context, and the block that ends there: the block of
            # this step's first token, the running block or the one it was copied from, both
            # allocated during this step.
            col = torch.div(ctx, bs, rounding_mode="floor")
            pos = self.boundary_pos[:n]
            torch.mul(col + 1, bs, out=pos)
            table = c.block_table_tensor[:n]
            col = col.long().clamp(max=table.shape[1] - 1)
            self.boundary_blocks[:n] = table.gather(1, col[:, None])[:, 0]
            extra.update(boundary_pos=pos, boundary_blocks=self.boundary_blocks[:n])
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        return KVBufferGDNAttentionMetadata(**fields, **extra)


class KVBufferGDNAttentionBackend(GDNAttentionBackend):
    """vLLM's GDN backend with :class:`KVBufferGDNAttentionMetadataBuilder`."""

    @staticmethod
    def get_name() -> str:
        return "KVBUFFER_GDN_ATTN"

    @staticmethod
    def get_builder_cls() -> type[KVBufferGDNAttentionMetadataBuilder]:
        return KVBufferGDNAttentionMetadataBuilder
