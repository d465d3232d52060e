import pytest
import torch
import torch.nn.functional as F
from tolerances import reduction_rtol

from ftrain import losses


def test_cross_entropy_matches_torch_sum_and_counts_non_ignored():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 2:] = -100
    s, n = losses.cross_entropy(logits, labels)
    ref = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="sum")
    # float64, a sum of 12 positive terms, each a log-softmax over 7: <= ~20 roundings per side (4.4e-15 relative);
    # rtol=1e-12 leaves 200x, and a dropped or extra token changes the sum by > 1e-2
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=0)
    assert int(n) == 12


def test_causal_shift_matches_transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 4:] = -100
    s, n = losses.cross_entropy(logits, labels, shift=True)
    ref = ForCausalLMLoss(logits, labels, vocab_size=11)
    # float32 is the point: ForCausalLMLoss upcasts to float32 whatever the logits' dtype. n = 8 positive terms,
    # each a log-softmax over V = 11, then / n: reduction_rtol(V + n) = 2.3e-6 (measured: equal). A shift off by
    # one or a wrong count changes the mean by > 1e-2.
    torch.testing.assert_close(s / n, ref, rtol=reduction_rtol(11 + int(n)), atol=0)
    assert int(n) == int((labels[:, 1:] != -100).sum())


def test_label_smoothing_matches_transformers_label_smoother():
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    logits = torch.randn(4, 9, dtype=torch.float64)
    labels = torch.tensor([1, -100, 3, 8])
    s, n = losses.cross_entropy(logits, labels, label_smoothing=0.1)
    ref = LabelSmoother(epsilon=0.1)({"logits": logits}, labels)
    # LabelSmoother sums the smoothing term (9 positive log-probs) in float32, the rest in float64: the float32
    # side's rounding, relative to that term and so to the loss, is <= gamma(9 + 1) <= reduction_rtol(9) = 1.1e-6
    # (measured 1.2e-8). A smoothing weight off by 1/V or a wrong count is > 1e-2.
    torch.testing.assert_close(s / n, ref, rtol=reduction_rtol(9), atol=0)


def test_mse_and_mean():
    p, t = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 0.0, 0.0])
    loss = losses.mse(p, t)
    assert float(loss.sum) == 21.0 and int(loss.count) == 3  # small integers: exact
    assert float(losses.mean(loss)) == 7.0


def test_shape_mismatch_and_float_labels_raise():
    with pytest.raises(ValueError, match="do not match"):
        losses.cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        losses.cross_entropy(torch.zeros(2, 4), torch.zeros(2))
