"""ModelRunner.logits: the chosen rows' logits; every row in order goes to
the LM head as it is (no index tensor, no copy), any other choice is gathered."""
from types import SimpleNamespace

import torch

from batchlm.engine.model_runner import ModelRunner


class _Head:
    def __init__(self):
        self.seen = []

    def compute_logits(self, hidden):
        self.seen.append(hidden)
        return hidden.double() * 2  # any function of the rows


def test_every_row_in_order_is_passed_as_is_and_other_choices_are_gathered():
    head = _Head()
    runner = SimpleNamespace(model=head)
    hidden = torch.randn(5, 3)
    out = ModelRunner.logits(runner, hidden, [0, 1, 2, 3, 4])
    assert head.seen[-1] is hidden and out.dtype == torch.float32
    assert torch.equal(out, (hidden.double() * 2).float())
    for rows in ([4, 3, 2, 1, 0], [0, 1, 2, 4], [1], [0, 1, 2, 3, 3], [0, 2, 1, 3, 4]):
        out = ModelRunner.logits(runner, hidden, rows)
        assert head.seen[-1] is not hidden
        assert torch.equal(out, (hidden[rows].double() * 2).float()), rows
