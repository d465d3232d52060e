"""The pure train / eval step against hand-written torch loops.

Equivalences (ftrain == torch, accumulation == one big batch, a list of microbatches == the stacked batch) are
mathematical claims, checked in float64 with ``FLOAT64`` (tests/tolerances.py); bitwise claims (rtol=0, torch.equal)
only compare runs of the same kernels on the same inputs in the same order, in this process.
"""

import pytest
import torch
from conftest import gpt_loss, lm_batches, make_gpt
from tolerances import FLOAT64, reduction_rtol

from ftrain import TrainState, losses, make_eval_step, make_train_step, optim, random, tree
from ftrain.step import causal_lm_loss, loss_item_count, make_loss_fn, model_kind, model_loss


def _assert_trees_close(a, b, rtol, atol=0.0):
    for (pa, la), lb in zip(zip(*tree.tree_flatten_with_path(a)[:2]), tree.tree_leaves(b)):
        torch.testing.assert_close(la, lb, rtol=rtol, atol=atol, msg=lambda m, p=pa: f"{tree.keystr(p)}: {m}")


def test_train_step_equals_a_hand_written_torch_adamw_loop():
    """Same GPT, same batches, dropout off, float64: the pure step == loss.backward() + torch.optim.AdamW."""
    batches = lm_batches(5)
    state = TrainState.create(
        make_gpt(dropout=0.0, dtype=torch.float64), optim.adamw(1e-2, weight_decay=0.1), key=0, copy=True
    )
    step = make_train_step(gpt_loss)
    ref = make_gpt(dropout=0.0, dtype=torch.float64)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in batches:
        state, metrics = step(state, batch)
        s, n = gpt_loss(ref, batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        # a mean over ~100 tokens of log-softmaxes over 64, positive terms: ~1e-15 relative (rtol=1e-12)
        torch.testing.assert_close(metrics["loss"], (s / n).detach(), rtol=1e-12, atol=0)
    for name, p in ref.named_parameters():
        # FLOAT64: Adam divides by sqrt(v), so an element whose gradient is rounding noise (the key bias: exactly 0
        # mathematically, ~1e-18 in float64) moves by <= lr · noise / eps = 1e-12 a step (measured 8e-14 after 5),
        # far below 1.1e-10, while a step of lr is 1e-2.
        torch.testing.assert_close(state.params[name], p.detach(), **FLOAT64)
    assert int(state.step) == 5
    assert float(metrics["learning_rate"]) == 1e-2  # the constant, held in float64: exact


def test_grad_norm_is_the_pre_clip_norm_like_clip_grad_norm():
    # float64: the same norm of the same gradients, summed in another order (FLOAT64)
    batch = lm_batches(1)[0]
    tx = optim.chain(optim.clip_by_global_norm(1e-3), optim.sgd(0.1))
    state = TrainState.create(make_gpt(dropout=0.0, dtype=torch.float64), tx, key=0, copy=True)
    _, metrics = make_train_step(gpt_loss)(state, batch)
    ref = make_gpt(dropout=0.0, dtype=torch.float64)
    losses.mean(gpt_loss(ref, batch)).backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    torch.testing.assert_close(metrics["grad_norm"], expected, **FLOAT64)


def test_step_does_not_mutate_its_inputs():
    state = TrainState.create(make_gpt(), optim.adamw(1e-2), key=0, copy=True)
    before = tree.tree_map(torch.clone, (state.params, state.opt_state))
    make_train_step(gpt_loss, accum_steps=2)(state, lm_batches(1)[0])
    _assert_trees_close((state.params, state.opt_state), before, rtol=0)  # bitwise: against clones
    assert int(state.step) == 0


def test_accumulation_32_equals_4_microbatches_of_8_with_variable_lengths():
    big = lm_batches(1, batch_size=32, seed=5)[0]
    assert len({int((row != -100).sum()) for row in big["labels"]}) > 4  # really variable lengths
    # SGD with lr 1: the parameter change is the gradient itself (Adam would amplify rounding near g = 0).
    # float64: accumulation == one big batch is a mathematical claim (FLOAT64); a microbatch weighted by its own
    # token count instead of the window's, or a lost microbatch, changes gradients by > 1e-3.
    model = make_gpt(dropout=0.0, dtype=torch.float64)
    s_full = TrainState.create(model, optim.sgd(1.0), key=0, copy=True)
    s_full, m_full = make_train_step(gpt_loss)(s_full, big)
    s_acc = TrainState.create(model, optim.sgd(1.0), key=0, copy=True)
    s_acc, m_acc = make_train_step(gpt_loss, accum_steps=4)(s_acc, big)
    _assert_trees_close(s_acc.params, s_full.params, **FLOAT64)
    torch.testing.assert_close(m_acc["loss"], m_full["loss"], **FLOAT64)
    assert int(m_acc["count"]) == int((big["labels"][:, 1:] != -100).sum())
    # Uneven microbatches as a list (e.g. the last window of an epoch): 8 + 24 == 32.
    uneven = [{k: v[:8] for k, v in big.items()}, {k: v[8:] for k, v in big.items()}]
    s_list = TrainState.create(model, optim.sgd(1.0), key=0, copy=True)
    s_list, _ = make_train_step(gpt_loss)(s_list, uneven)
    _assert_trees_close(s_list.params, s_full.params, **FLOAT64)


def test_batchnorm_statistics_are_threaded_through_the_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref.load_state_dict(model.state_dict())
    state = TrainState.create(model, optim.sgd(0.1), key=0, copy=True)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    new, _ = make_train_step(lambda m, b: losses.mse(m(b[0]), b[1]))(state, (x, y))
    ref(x)
    # bitwise: the same Linear and batch_norm kernels on the same input and weights, in this process
    assert torch.equal(new.buffers["1.running_mean"], ref[1].running_mean)
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    assert float(state.buffers["1.running_mean"].abs().sum()) == 0.0  # the old state is untouched


def test_dropout_is_deterministic_from_the_key_and_resumes_bitwise(tmp_path):
    from safetensors.torch import load_file, save_file

    batches = lm_batches(20)
    step = make_train_step(gpt_loss)

    def run(state, bs):
        for b in bs:
            state, _ = step(state, b)
        return state

    fresh = lambda: TrainState.create(make_gpt(dropout=0.1), optim.adamw(1e-2), key=random.key(7), copy=True)  # noqa: E731
    # bitwise: the same float32 kernels, inputs and dropout draws in the same order, in this process
    a = run(fresh(), batches)
    b = run(fresh(), batches)
    _assert_trees_close(a.params, b.params, rtol=0)
    other = run(TrainState.create(make_gpt(dropout=0.1), optim.adamw(1e-2), key=random.key(8), copy=True), batches)
    assert not torch.equal(other.params["wte.weight"], a.params["wte.weight"])
    # Stop at step 10, save every leaf with safetensors, restore into a fresh state, continue to 20.
    half = run(fresh(), batches[:10])
    paths, leaves, _ = tree.tree_flatten_with_path(half)
    save_file({tree.keystr(p): leaf.contiguous() for p, leaf in zip(paths, leaves)}, tmp_path / "s.safetensors")
    loaded = load_file(tmp_path / "s.safetensors")
    template = fresh()
    t_paths, _, spec = tree.tree_flatten_with_path(template)
    resumed = tree.tree_unflatten(spec, [loaded[tree.keystr(p)] for p in t_paths])
    resumed = run(resumed, batches[10:])
    _assert_trees_close(resumed, a, rtol=0)  # bitwise: safetensors copies bytes, then the same kernels run


def test_eval_step_is_the_token_weighted_loss_in_eval_mode():
    # float64, FLOAT64: dropout 0.5 left on would change the loss by > 1e-2
    model = make_gpt(dropout=0.5, dtype=torch.float64)
    state = TrainState.create(model, optim.sgd(0.1), key=0, copy=True)
    batch = lm_batches(1)[0]
    metrics = make_eval_step(gpt_loss)(state, batch)
    model.eval()
    s, n = gpt_loss(model, batch)
    torch.testing.assert_close(metrics["loss"], s / n, **FLOAT64)
    assert state.skeleton.training is False


def test_transformers_gpt2_step_equals_its_own_loss_and_backward():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).double()
    batch = lm_batches(1)[0]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    state = TrainState.create(model, optim.sgd(0.5), key=0, copy=True)
    new, metrics = make_train_step(causal_lm_loss)(state, batch)
    # The update is a mathematical claim, checked in float64 (FLOAT64) against transformers' model and the mean
    # cross-entropy of the shifted labels computed by torch in float64: transformers' own loss upcasts the logits
    # to float32 whatever the model's dtype, so its gradient carries float32 rounding (3e-7 seen).
    v = cfg.vocab_size
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(new.params[name], p.detach() - 0.5 * p.grad, **FLOAT64)
    # The loss against transformers' own, float32 as it computes it: n positive terms, each a log-softmax over V,
    # rounded in float32 on that side only: reduction_rtol(V + n) = 2e-5 (seen 7e-8); a shift off by one or a
    # wrong count moves the mean by > 1e-2.
    out = model(**batch)
    rtol = reduction_rtol(v + int(metrics["count"]))
    torch.testing.assert_close(metrics["loss"], out.loss.detach().double(), rtol=rtol, atol=0)
    # The model's own loss works too (one count per microbatch): the same float32 computation on the same logits.
    _, m2 = make_train_step(model_loss)(state, batch)
    torch.testing.assert_close(m2["loss"], out.loss.detach(), **FLOAT64)


def test_make_loss_fn_is_the_plain_losses_chosen_by_the_model_class():
    """The Trainer's default loss (train and eval) is the core's make_loss_fn: for a causal LM it is causal_lm_loss
    plus the outputs, for a regression head the MSE over its rows, for a model of no known kind (or without labels)
    the model's own loss, counted 1; loss_item_count gives each count from the labels alone."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, pad_token_id=0)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**cfg)).double().eval()
    batch = lm_batches(1)[0]
    loss, outputs = make_loss_fn(lm)(lm, batch)
    plain = causal_lm_loss(lm, batch)
    assert torch.equal(loss.sum, plain.sum) and int(loss.count) == int((batch["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape == (8, 16, 64) and torch.equal(loss_item_count(lm, batch), loss.count)
    with pytest.raises(ValueError, match="did not return a loss.*needs labels"):
        make_loss_fn(lm)(lm, {"input_ids": batch["input_ids"]})  # no labels: the model's own loss, which it lacks
    reg = GPT2ForSequenceClassification(GPT2Config(**cfg, num_labels=1)).double().eval()
    targets = {"input_ids": batch["input_ids"], "labels": torch.randn(8, 1, dtype=torch.float64)}
    loss, outputs = make_loss_fn(reg)(reg, targets)
    torch.testing.assert_close(loss.sum, ((outputs.logits - targets["labels"]) ** 2).sum(), **FLOAT64)
    assert int(loss.count) == 8 and torch.equal(loss_item_count(reg, targets), loss.count)
    multi = GPT2ForSequenceClassification(GPT2Config(**cfg, num_labels=3, problem_type="multi_label_classification"))
    multi.eval()
    assert [model_kind(m) for m in (lm, reg, multi)] == ["causal_lm", "sequence_classification", "other"]
    tags = {"input_ids": batch["input_ids"], "labels": torch.ones(8, 3)}
    own, outputs = make_loss_fn(multi)(multi, tags)  # a kind of its own: the model's loss, one item per batch
    assert torch.equal(own.sum, outputs.loss) and torch.equal(own.sum, model_loss(multi, tags).sum)
    assert int(own.count) == 1 and torch.equal(loss_item_count(multi, tags), own.count)


def test_missing_batch_key_names_the_key_and_the_fix():
    state = TrainState.create(make_gpt(), optim.sgd(0.1), key=0, copy=True)
    batch = {"input_ids": lm_batches(1)[0]["input_ids"]}
    with pytest.raises(KeyError, match=r"reads batch\['labels'\].*only the keys \['input_ids'\]"):
        make_train_step(gpt_loss)(state, batch)


def test_loss_returning_a_mean_is_rejected_and_accum_must_divide():
    state = TrainState.create(make_gpt(), optim.sgd(0.1), key=0, copy=True)
    batch = lm_batches(1)[0]
    with pytest.raises(TypeError, match="must return \\(sum, count\\)"):
        make_train_step(lambda m, b: losses.mean(gpt_loss(m, b)))(state, batch)
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] has shape \(8, 16\).*divisible by 3"):
        make_train_step(gpt_loss, accum_steps=3)(state, batch)
