"""Pieces of the blend's GPU path that run anywhere: staged-row mapping and grouped attention received."""

import torch

from kvblend.blend.select import attention_received
from kvblend.blend.source import staged_rows


def test_staged_rows_find_each_row_in_the_group_blocks():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 3, 12, 5]
    group, layers = 3, 3
    chunks = [torch.randn(layers, n, 2, generator=gen) for n in lengths]
    staging = torch.cat([c.reshape(layers * n, 2) for c, n in zip(chunks, lengths)])  # [group, n] blocks, in order
    rows = torch.randperm(sum(lengths), generator=gen)[:15]
    for layer in range(layers):
        concatenated = torch.cat([c[layer] for c in chunks])
        mapped = staged_rows(rows, torch.tensor(lengths), group, layer)
        assert torch.equal(staging[mapped], concatenated[rows])


def test_attention_received_matches_expanded_heads():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(9, 8, 16, generator=gen).to(torch.bfloat16)
    k = torch.randn(40, 2, 16, generator=gen).to(torch.bfloat16)
    k_pos = torch.arange(40)
    q_pos = torch.sort(torch.randperm(40, generator=gen)[:9]).values
    kf = k.float().repeat_interleave(4, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ kf.transpose(1, 2) / 4.0
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    expected = torch.softmax(scores, dim=-1).mean(dim=(0, 1))
    torch.testing.assert_close(attention_received(q, q_pos, k, k_pos), expected, rtol=1e-5, atol=1e-7)
