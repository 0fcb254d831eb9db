"""The memory planner: the transformer formula against instantiated models, the table's consistency."""

from __future__ import annotations

import torch

from unipic.unipic3 import memory
from unipic.unipic3.tiny import TINY_CONFIG


def test_transformer_formula_counts_instantiated_models(tiny_pipe):
    total, linear_params = memory.transformer_params(TINY_CONFIG["transformer"])
    assert total == sum(p.numel() for p in tiny_pipe.transformer.parameters())
    in_linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                    for m in tiny_pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert linear_params == in_linear
    full, _ = memory.transformer_params(memory.TRANSFORMER)
    assert 20.4e9 < full < 20.5e9  # Qwen-Image's 20B MMDiT


def test_peaks_are_ordered_and_the_table_prints(capsys):
    for inputs in (1, 3, 6):
        peaks = [memory.peak_bytes(p, inputs, offload) for p in ("bf16", "fp8", "nf4") for offload in (False, True)]
        assert peaks[0] > peaks[2] > peaks[4] and all(peaks[i] > peaks[i + 1] for i in (0, 2, 4))
    assert memory.fits(memory.peak_bytes("bf16", 1, False)) == [80]
    memory.main([])
    out = capsys.readouterr().out
    assert "| bf16 | 6 |" in out and "| nf4 | 1 |" in out
