"""training_step overrides, NEFTune, bf16 autocast, fp16, activation checkpointing (against transformers.Trainer), and
torch_compile with them (against the eager Trainer).

Equivalences (ftrain == transformers, override == built-in, checkpointed == plain, compiled == eager) run the float64
``tiny_gpt2()`` of test_trainer_parity.py and compare to ``FLOAT64`` (``APPROX64`` for logged scalars; a loss that
transformers logs carries its float32 accumulator: ``hf_loss_rtol``). bf16, fp16 and NEFTune's draw against
transformers' hook are about float32, so those tests build a float32 model and derive their tolerances.
"""

import math

import pytest
import torch
from tolerances import FLOAT64, UNIT_ROUNDOFF, reduction_rtol

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, ARGS, hf_loss_rtol, tiny_gpt2, token_rows  # noqa: E402


def _run(trainer_cls, args_cls, tmp_path, name, data=None, dtype=torch.float64, **overrides):
    args = args_cls(output_dir=str(tmp_path / name), **{**ARGS, **overrides})
    model = tiny_gpt2(dtype)
    trainer = trainer_cls(model=model, args=args, train_dataset=data if data is not None else token_rows())
    trainer.train()
    return trainer


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


# ---- training_step overrides ----------------------------------------------------------------------------------------


def _custom(base):
    """transformers' documented pattern: a custom compute_loss and a training_step doing extra work, then super()."""

    class Custom(base):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = outputs.loss * 0.5 + 0.1 * outputs.logits.pow(2).mean()
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            type(self).calls += 1
            labels = inputs["labels"].clone()
            labels[:, :4] = -100  # ignore the first positions of every row
            return super().training_step(model, {**inputs, "labels": labels}, num_items_in_batch)

    return Custom


def test_compute_loss_and_training_step_overrides_match_transformers(tmp_path):
    kw = dict(gradient_accumulation_steps=1, max_steps=4)
    hf = _run(_custom(transformers.Trainer), transformers.TrainingArguments, tmp_path, "hf", **kw)
    ft_cls = _custom(Trainer)
    ft = _run(ft_cls, TrainingArguments, tmp_path, "ft", **kw)
    assert ft_cls.calls == 4
    plain = _run(Trainer, TrainingArguments, tmp_path, "plain", **kw)
    assert _losses(ft) == pytest.approx(_losses(hf), rel=hf_loss_rtol(1))  # 1 microbatch per logged step
    # the overrides took effect: they halve the loss and add a penalty, far beyond any rounding (0.1% apart at least)
    assert _losses(ft)[0] != pytest.approx(_losses(plain)[0], rel=1e-3)
    hf_p, ft_p = _params(hf), _params(ft)
    for name in ft_p:  # float64 params after 4 AdamW steps
        torch.testing.assert_close(ft_p[name], hf_p[name], **FLOAT64)


def test_training_step_override_modifying_the_loss_takes_effect(tmp_path):
    class Doubled(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return 2.0 * super().training_step(model, inputs, num_items_in_batch)

    class DoubledLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2.0 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    kw = dict(max_steps=3, gradient_accumulation_steps=1, optim="sgd", warmup_steps=0)
    doubled = _run(Doubled, TrainingArguments, tmp_path, "a", **kw)
    reference = _run(DoubledLoss, TrainingArguments, tmp_path, "b", **kw)
    plain = _run(Trainer, TrainingArguments, tmp_path, "c", **kw)
    # float64, ftrain against ftrain: the doubled loss through training_step or compute_loss is the same mathematics
    assert _losses(doubled) == pytest.approx(_losses(reference), **APPROX64)
    assert _losses(doubled)[0] == pytest.approx(2 * _losses(plain)[0], **APPROX64)
    for name, p in _params(doubled).items():
        torch.testing.assert_close(p, _params(reference)[name], **FLOAT64)


def test_training_step_override_with_default_loss_keeps_token_weighting(tmp_path):
    class Passthrough(Trainer):
        seen = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            type(self).seen.append(int(num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    rows = token_rows()
    rows = rows.map(lambda r, i: {"labels": [-100] * (i % 5) + r["labels"][i % 5 :]}, with_indices=True)
    over = _run(Passthrough, TrainingArguments, tmp_path, "a", data=rows, max_steps=3)
    plain = _run(Trainer, TrainingArguments, tmp_path, "b", data=rows, max_steps=3)
    assert len(Passthrough.seen) == 6 and len(set(Passthrough.seen)) > 1  # 3 steps x 2 microbatches, uneven counts
    # float64: the per-microbatch path weighted by num_items_in_batch against the fused default loss
    assert _losses(over) == pytest.approx(_losses(plain), **APPROX64)
    for name, p in _params(over).items():
        torch.testing.assert_close(p, _params(plain)[name], **FLOAT64)


def test_training_step_returning_a_detached_loss_is_refused(tmp_path):
    class Detached(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs, num_items_in_batch).detach()

    with pytest.raises(RuntimeError, match="return the microbatch's differentiable loss"):
        _run(Detached, TrainingArguments, tmp_path, "a", max_steps=1)


# ---- NEFTune --------------------------------------------------------------------------------------------------------


def test_neftune_hook_draws_transformers_noise(tmp_path):
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    alpha, ids = 5.0, torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    # float32: transformers' hook computes the noise's scale alpha / sqrt(L·d) as a float32 tensor, so only in float32
    # do the two hooks draw bit for bit the same numbers (in float64 the scales differ by that float32 rounding).
    hf_model, ft_model = tiny_gpt2(torch.float32).train(), tiny_gpt2(torch.float32).train()
    clean = ft_model.get_input_embeddings()(ids)
    handle = activate_neftune(hf_model, alpha)
    torch.manual_seed(123)
    hf_out = hf_model.get_input_embeddings()(ids)
    deactivate_neftune(hf_model, handle)

    args = TrainingArguments(str(tmp_path), **{**ARGS, "neftune_noise_alpha": alpha})
    trainer = Trainer(model=ft_model, args=args, train_dataset=token_rows())
    assert trainer._activate_neftune(ft_model) is ft_model  # transformers 4.x: returns the model, keeps the handle
    torch.manual_seed(123)
    ft_out = ft_model.get_input_embeddings()(ids)
    ft_model.eval()
    assert torch.equal(ft_model.get_input_embeddings()(ids), clean)  # eval: no noise (the same lookup: bitwise)
    trainer._deactivate_neftune(ft_model)
    assert len(ft_model.get_input_embeddings()._forward_hooks) == 0 and trainer.neftune_hook_handle is None
    with pytest.raises(ValueError, match="Neftune is not activated"):  # transformers' message when none is active
        trainer._deactivate_neftune(ft_model)
    ft_model.train()
    assert torch.equal(ft_model.get_input_embeddings()(ids), clean)  # removed

    assert torch.equal(ft_out, hf_out)  # the same draw from the same generator state, added by the same kernel
    bound = alpha / math.sqrt(16 * 32)
    noise = ft_out - clean
    # |noise| <= bound up to float32 rounding: the bound rounded to float32, the draw's affine map to (-m, m) (2
    # roundings), then (clean + noise) - clean (2): at most 6 roundings, each <= u·(|clean| + bound) in size.
    slack = 6 * UNIT_ROUNDOFF[torch.float32] * (clean.abs().max().item() + bound)
    # 1536 uniform draws: the largest is above 0.9·bound unless all miss the top 10% (probability 0.9**1536)
    assert noise.abs().max() <= bound + slack and noise.abs().max() > 0.9 * bound
    # statistics of 1536 draws of U(-b, b): the mean's standard error is b/sqrt(3·1536) = 0.015b, so 0.05b is 3.4 of
    # them; the variance's (b²/3) relative standard error is sqrt(4/5/1536) = 0.023, so 5% is 2.2 of them
    assert noise.mean().abs() < 0.05 * bound and noise.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


def test_neftune_changes_training_not_eval_and_leaves_the_model_alone(tmp_path):
    evals = token_rows(8, seed=2)
    kw = dict(max_steps=3)
    base = _run(Trainer, TrainingArguments, tmp_path, "base", **kw)
    runs = [_run(Trainer, TrainingArguments, tmp_path, f"n{i}", neftune_noise_alpha=5.0, **kw) for i in range(2)]
    assert _losses(runs[0]) == _losses(runs[1])  # the step seeds the noise: the same draws and kernels, bitwise
    # the noise moved the first loss (by 8e-5 relative), far more than float64 rounding could
    assert _losses(runs[0])[0] != pytest.approx(_losses(base)[0], **APPROX64)
    assert all(not m._forward_hooks for m in runs[0].model.modules())  # no hook leaks onto the user's model
    assert all(not m._forward_hooks for m in runs[0]._train_state.skeleton.modules())
    # Evaluation has no noise: same weights, same eval loss with and without NEFTune.
    fresh = [
        Trainer(
            model=tiny_gpt2(),
            args=TrainingArguments(str(tmp_path / f"e{a}"), **{**ARGS, **kw}, neftune_noise_alpha=a),
            eval_dataset=evals,
        )
        for a in (None, 5.0)
    ]
    assert fresh[0].evaluate()["eval_loss"] == fresh[1].evaluate()["eval_loss"]  # same weights and kernels: bitwise


# ---- bf16 -----------------------------------------------------------------------------------------------------------


def test_bf16_autocasts_the_forward_and_matches_transformers(tmp_path):
    class Recording(Trainer):
        dtypes = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            type(self).dtypes.append(outputs.logits.dtype)
            return (loss, outputs) if return_outputs else loss

    # float32 params: autocast casts float32 (not float64) to bfloat16, and bf16 mixed precision is the point here
    kw = dict(bf16=True, max_steps=3, dtype=torch.float32)
    _run(Recording, TrainingArguments, tmp_path, "rec", **kw)
    assert Recording.dtypes and set(Recording.dtypes) == {torch.bfloat16}
    hf = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path, "hf", **kw)
    ft = _run(Trainer, TrainingArguments, tmp_path, "ft", **kw)
    fp32 = _run(Trainer, TrainingArguments, tmp_path, "fp32", max_steps=3, dtype=torch.float32)
    losses_ft, losses_hf = _losses(ft), _losses(hf)
    # Steps 1-2 run on the initial weights (warmup: update 1 has lr 0): the same bf16 forward on both sides, then the
    # float32 cross-entropy over the step's 2 x 4 x 15 predicted tokens summed in another order, plus transformers'
    # 2 float32 accumulations: reduction_rtol(122) = 1.5e-5 (measured 1.1e-7).
    assert losses_ft[:2] == pytest.approx(losses_hf[:2], rel=reduction_rtol(2 * 4 * 15 + 2, torch.float32))
    # After an lr > 0 update the weights differ: the two trainers round their bf16 gradients at different points
    # (transformers scales each microbatch's loss before its backward, ftrain the sum after: grad_norm differs by
    # 4e-4 at step 1), and Adam turns that into weight differences up to adam_drift. The two runs' logits z then
    # land on the same or neighbouring bf16 values (measured: at most 1 bf16 ulp apart), |Δz| <= 2·u_bf16·|z|, and a
    # token's cross-entropy moves by at most 2·max|Δz|. max|z| ~ 0.6 is below half the loss (~4.2 = log 64), so
    # 2·u_bf16 = 7.8e-3 relative bounds the loss (measured 1.7e-6 at step 3, 7e-6 on the eval loss).
    bf16_rtol = 2 * UNIT_ROUNDOFF[torch.bfloat16]
    assert losses_ft[2:] == pytest.approx(losses_hf[2:], rel=bf16_rtol)
    # bf16 really changed the arithmetic: float32 training of this model is deterministic in one process (the fp16
    # test below gets two bitwise-equal runs), so any difference from the float32 run comes from bf16
    assert losses_ft != _losses(fp32)
    assert all(p.dtype == torch.float32 for p in ft.model.parameters())  # params stay fp32
    evals = token_rows(8, seed=2)
    assert ft.evaluate(evals)["eval_loss"] == pytest.approx(hf.evaluate(evals)["eval_loss"], rel=bf16_rtol)


# ---- fp16 -----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what fp16 does on the CPU")
def test_fp16_on_cpu_is_refused_and_leaving_it_off_is_what_transformers_trains(tmp_path):
    # float32 params: an fp16 autocast would act on them (not on float64 ones), so only they show it is absent
    kw = dict(max_steps=3, dtype=torch.float32)
    hf_fp16 = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path, "hf16", fp16=True, **kw)
    assert hf_fp16.accelerator.scaler is None  # transformers/accelerate: no GradScaler and no autocast on the CPU
    hf_fp32 = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path, "hf32", **kw)
    assert _losses(hf_fp16) == _losses(hf_fp32)  # ...so its fp16=True is float32 training, bit for bit
    with pytest.raises(ValueError, match="on the CPU transformers ignores it and trains in float32"):
        TrainingArguments(str(tmp_path / "ft16"), **{**ARGS, "max_steps": 3}, fp16=True)
    # the advice, leave fp16 off, trains what transformers' fp16=True trains: an equivalence, checked in float64
    kw64 = dict(max_steps=3)
    hf_fp16_64 = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path, "hf16-64", fp16=True, **kw64)
    ft = _run(Trainer, TrainingArguments, tmp_path, "ft", **kw64)
    assert _losses(ft) == pytest.approx(_losses(hf_fp16_64), rel=hf_loss_rtol(2))  # 2 microbatches per step
    for name, p in _params(ft).items():
        torch.testing.assert_close(p, _params(hf_fp16_64)[name], **FLOAT64)


# ---- activation checkpointing ----------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_losses_and_grads(tmp_path):
    class Counting(Trainer):
        recomputed = 0

        def _enable_activation_checkpointing(self, skeleton):
            super()._enable_activation_checkpointing(skeleton)
            for module in skeleton.modules():
                func = getattr(module, "_gradient_checkpointing_func", None)
                if func is not None:

                    def counted(*a, _func=func, **k):
                        type(self).recomputed += 1
                        return _func(*a, **k)

                    module._gradient_checkpointing_func = counted

    kw = dict(max_steps=3)
    plain = _run(Trainer, TrainingArguments, tmp_path, "plain", **kw)
    ckpt = _run(Counting, TrainingArguments, tmp_path, "ckpt", activation_checkpointing=True, **kw)
    assert Counting.recomputed == 3 * 2 * 2  # steps x microbatches x layers
    assert not tiny_gpt2().transformer.h[0].gradient_checkpointing
    assert (
        not plain.model.transformer.h[0].gradient_checkpointing
        and not ckpt.model.transformer.h[0].gradient_checkpointing
    )
    grads = lambda t: [e["grad_norm"] for e in t.state.log_history if "grad_norm" in e]  # noqa: E731
    # float64: recomputing the forward in the backward is the same mathematics as keeping its activations
    assert _losses(ckpt) == pytest.approx(_losses(plain), **APPROX64)
    assert grads(ckpt) == pytest.approx(grads(plain), **APPROX64)
    for name, p in _params(ckpt).items():
        torch.testing.assert_close(p, _params(plain)[name], **FLOAT64)


# ---- torch_compile with the specials ---------------------------------------------------------------------------------


class _CompiledSpecials(Trainer):
    """A compute_loss and a training_step override (as in the transformers parity test above, without the call
    counter: a class attribute mutated inside a traced step would be a graph break)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss * 0.5 + 0.1 * outputs.logits.pow(2).mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs["labels"].clone()
        labels[:, :4] = -100
        return super().training_step(model, {**inputs, "labels": labels}, num_items_in_batch)


@pytest.fixture
def restore_determinism(monkeypatch):
    """full_determinism flips torch's global deterministic mode and sets env vars: put both back afterwards."""
    import os

    from ftrain.trainer.utils import _DETERMINISM_ENV

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for key in _DETERMINISM_ENV:  # monkeypatch puts each back (or removes it) at teardown
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_torch_compile_with_activation_checkpointing_is_refused_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match="torch_compile=True cannot be combined with activation_checkpointing"):
        TrainingArguments(str(tmp_path), **ARGS, torch_compile=True, activation_checkpointing=True)
    args = TrainingArguments(str(tmp_path), **ARGS, torch_compile=True)
    with pytest.raises(ValueError, match="torch_compile=True cannot be combined with activation_checkpointing"):
        args.set_training(activation_checkpointing=True)  # the setters validate like the constructor


@pytest.mark.compiled
def test_torch_compile_with_neftune_and_loss_overrides_matches_eager(tmp_path, restore_determinism):
    # full_determinism makes the compiled step draw eager's random numbers, so NEFTune's noise is the same draw.
    kw = dict(max_steps=4, neftune_noise_alpha=5.0, full_determinism=True)
    eager = _run(_CompiledSpecials, TrainingArguments, tmp_path, "eager", **kw)
    compiled = _run(_CompiledSpecials, TrainingArguments, tmp_path, "compiled", torch_compile=True, **kw)
    quiet = _run(_CompiledSpecials, TrainingArguments, tmp_path, "quiet", **{**kw, "neftune_noise_alpha": None})
    step = compiled._train_step
    assert step.calls == 4 and step.compiles >= 1 and step.recompiles == 0
    # float64 (tiny_gpt2()): compiled == eager is the same mathematics with fused kernels
    assert _losses(eager)[0] != pytest.approx(_losses(quiet)[0], **APPROX64)  # NEFTune's noise moves the loss...
    assert _losses(compiled) == pytest.approx(_losses(eager), **APPROX64)  # ...and the compiled run drew the same
    grads = lambda t: [e["grad_norm"] for e in t.state.log_history if "grad_norm" in e]  # noqa: E731
    assert grads(compiled) == pytest.approx(grads(eager), **APPROX64)
    for name, p in _params(compiled).items():
        torch.testing.assert_close(p, _params(eager)[name], **FLOAT64)
    assert all(not m._forward_hooks for m in compiled._train_state.skeleton.modules())  # hook removed after train
