"""rewrite_kv_cache: one in-place oiv2::kv_write per k and v cache write, nothing else."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import CacheSpec
from oiv2compile.config import BuildConfig
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from tests.passes.helpers import DECODE, PREFILL, aten, captured, count, export_toy, run, snapshot

WRITES = (aten.index_put_.default, aten.index_put.default)


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_rewrites_every_cache_write(preset, program):
    prog, spec = captured(preset, program)
    gm = prog.graph_module
    before = snapshot(gm)
    layers = spec.num_layers
    assert count(gm, *WRITES) == 2 * layers
    assert count(gm, torch.ops.oiv2.kv_write.default) == 0

    assert rewrite_kv_cache(gm, BuildConfig()) == 2 * layers
    cleanup(gm)

    assert count(gm, *WRITES) == 0
    assert count(gm, torch.ops.oiv2.kv_write.default) == 2 * layers
    assert count(gm, aten.copy_.default) == 0
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _OtherWrites(torch.nn.Module):
    """index_put_ calls that are not the executor's cache writes: into a non-cache input, with
    accumulate, and at positions that do not come from the positions input."""

    def forward(self, input_ids, positions, slots, last_index, caches):
        k, v = caches
        rows = torch.zeros(2, 1, 1, 4)
        heads = torch.arange(1)[None, :, None]
        k.index_put_((slots[:, None, None], heads, positions[:, None, None]), rows, accumulate=True)
        v.index_put_((slots[:, None, None], heads, input_ids[:, None, :]), rows)
        scratch = torch.zeros(3, 1, 8, 4)
        scratch.index_put_((slots[:, None, None], heads, positions[:, None, None]), rows)
        return k.sum() + v.sum() + scratch.sum() + last_index.sum()


def test_does_not_fire_on_other_writes():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, max_seq_len=8, max_batch_size=2, dtype="float32")
    gm = export_toy(_OtherWrites(), spec)
    writes = count(gm, *WRITES)
    assert writes == 3
    assert rewrite_kv_cache(gm, BuildConfig()) == 0
    assert count(gm, *WRITES) == writes
    assert count(gm, torch.ops.oiv2.kv_write.default) == 0
