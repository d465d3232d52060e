"""The Trainer's eager default path donates its state (issue 15): each step writes the new state into the previous
state's tensors, which are ``trainer.model``'s own, so the model's parameters see every update in place, as
transformers' (whose optimizer steps the model's parameters in place) do.

The reference is transformers.Trainer run side by side on the same float64 tiny GPT-2 (tests/trainer/
test_trainer_parity.py): the parameters a callback reads from its ``model`` argument after each step are compared
with transformers' at the same step, to ``FLOAT64`` (two float64 computations of the same mathematics).
"""

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from ftrain import tree  # noqa: E402
from ftrain.state import Donated  # noqa: E402
from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, ARGS, tiny_gpt2, token_rows  # noqa: E402

SETTINGS = {**ARGS, "max_steps": 3}


def _recorder(base):
    class Recorder(base):
        """After each step: the parameters of the ``model`` callbacks are given (read as they are, nothing synced);
        for ftrain, also the train state before and after the step and its tensors' storage."""

        def __init__(self):
            self.trainer, self.params, self.before, self.after = None, [], [], []

        def _state(self):
            state = self.trainer._train_state
            return state, {id(state): [t.data_ptr() for t in tree.tree_leaves((state.params, state.opt_state))]}

        def on_step_begin(self, args, state, control, **kwargs):
            if self.trainer is not None:
                self.before.append(self._state())

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.params.append({k: v.detach().clone() for k, v in model.named_parameters()})
            if self.trainer is not None:
                self.after.append(self._state())

    return Recorder


def _run(trainer_cls, args_cls, callback_base, tmp_path, name, **settings):
    recorder = _recorder(callback_base)()
    args = args_cls(output_dir=str(tmp_path / name), **(settings or SETTINGS))
    trainer = trainer_cls(model=tiny_gpt2(), args=args, train_dataset=token_rows(), callbacks=[recorder])
    if trainer_cls is Trainer or issubclass(trainer_cls, Trainer):
        recorder.trainer = trainer
    trainer.train()
    return trainer, recorder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("donation")
    return {
        "hf": _run(transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback, tmp, "hf"),
        "ft": _run(Trainer, TrainingArguments, TrainerCallback, tmp, "ft"),
    }


def test_eager_default_step_writes_into_the_previous_state(runs):
    trainer, rec = runs["ft"]
    assert not trainer.plan.step.torch_compile and trainer._train_step.donate
    assert len(rec.before) == len(rec.after) == 3
    for (old, old_ptrs), (new, new_ptrs) in zip(rec.before, rec.after):
        assert new is not old
        assert new_ptrs[id(new)] == old_ptrs[id(old)]  # params and optimizer state: the same storage, updated
        assert isinstance(old.params, Donated)  # the stepped state is dead; using it raises with the fix
    with pytest.raises(RuntimeError, match="donated to a step"):
        rec.before[0][0].params["transformer.wte.weight"]


def test_model_parameters_share_the_state_storage(runs):
    trainer, _ = runs["ft"]
    state = trainer._train_state.params
    for name, p in trainer.model.named_parameters():
        assert p.data_ptr() == state[name].data_ptr(), name


def test_model_parameters_see_each_update_as_transformers(runs):
    (_, hf), (_, ft) = runs["hf"], runs["ft"]
    assert len(ft.params) == len(hf.params) == 3
    initial = dict(tiny_gpt2().named_parameters())
    for step, (a, b) in enumerate(zip(hf.params, ft.params), start=1):
        assert a.keys() == b.keys()
        for name in a:
            # float64 after `step` AdamW steps on both sides (the parity test measures 6.3e-15 after 10)
            torch.testing.assert_close(b[name], a[name], **FLOAT64, msg=f"{name} after step {step}")
        # the comparison has teeth: each step moved the weights by ~lr, far above FLOAT64
        if step > 1:  # step 1 runs at lr 0 (warm-up)
            assert not torch.allclose(b["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])


def _hooked(base):
    class Hooked(base):
        """Overrides the per-microbatch hooks (counting, then super()); compute_loss doubles the loss (in
        transformers a change made in training_step after super() would reach the log only: its backward ran)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts = {"_prepare_inputs": 0, "training_step": 0, "compute_loss": 0}

        def _prepare_inputs(self, inputs):
            self.counts["_prepare_inputs"] += 1
            return super()._prepare_inputs(inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.counts["compute_loss"] += 1
            return 2.0 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.counts["training_step"] += 1
            return super().training_step(model, inputs, num_items_in_batch)

    return Hooked


def test_subclass_hooks_run_and_train_as_transformers_with_donation(tmp_path):
    """A subclass overriding _prepare_inputs, compute_loss and training_step: each runs as often as in
    transformers (once per microbatch), the doubled loss trains the same weights, and the step still donates.
    Without clipping (max_grad_norm=0) the doubled loss doubles the gradients, so grad_norm shows it took effect."""
    settings = {**SETTINGS, "gradient_accumulation_steps": 1, "optim": "sgd", "warmup_steps": 0, "max_grad_norm": 0}
    out = {}
    for side, (trainer_cls, args_cls) in {
        "hf": (transformers.Trainer, transformers.TrainingArguments),
        "ft": (Trainer, TrainingArguments),
    }.items():
        args = args_cls(output_dir=str(tmp_path / side), **settings)
        trainer = _hooked(trainer_cls)(model=tiny_gpt2(), args=args, train_dataset=token_rows())
        trainer.train()
        out[side] = trainer
    hf, ft = out["hf"], out["ft"]
    assert ft.counts == hf.counts == {"_prepare_inputs": 3, "training_step": 3, "compute_loss": 3}
    assert ft._train_step.donate
    hf_params = dict(hf.model.named_parameters())
    for name, p in ft.model.named_parameters():  # float64 after 3 SGD steps on the doubled loss
        torch.testing.assert_close(p.detach(), hf_params[name].detach(), **FLOAT64)
    hf_norms = [e["grad_norm"] for e in hf.state.log_history if "grad_norm" in e]
    ft_norms = [e["grad_norm"] for e in ft.state.log_history if "grad_norm" in e]
    assert ft_norms == pytest.approx(hf_norms, **APPROX64) and len(ft_norms) == 3
    plain = _run(Trainer, TrainingArguments, TrainerCallback, tmp_path, "plain", **settings)[0]
    plain_norm = next(e["grad_norm"] for e in plain.state.log_history if "grad_norm" in e)
    assert ft_norms[0] == pytest.approx(2 * plain_norm, **APPROX64)  # the override doubled the first gradient


def _closure_values(fn, seen=None):
    """Every value reachable from ``fn`` through closure cells (functions recursively)."""
    seen = set() if seen is None else seen
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if id(value) not in seen:
            seen.add(id(value))
            yield value
            yield from _closure_values(value, seen)


def test_default_loss_holds_no_trainer_and_an_overridden_context_still_runs(tmp_path):
    """Without overridden hooks the step's loss function refers to no Trainer (so ftrain.jit can save the step it
    precompiles: a Trainer does not pickle); a subclass overriding compute_loss_context_manager gets it called once
    per microbatch, as transformers' training_step does, and trains the same weights."""
    plain = Trainer(model=tiny_gpt2(), args=TrainingArguments(str(tmp_path / "plain"), **SETTINGS))
    assert not any(v is plain for v in _closure_values(plain._make_loss_fn()))

    def counted(base):
        class Counted(base):
            calls = 0

            def compute_loss_context_manager(self):
                type(self).calls += 1
                return super().compute_loss_context_manager()

        return Counted

    settings = {**SETTINGS, "gradient_accumulation_steps": 2}
    out = {}
    for side, (trainer_cls, args_cls) in {
        "hf": (transformers.Trainer, transformers.TrainingArguments),
        "ft": (Trainer, TrainingArguments),
    }.items():
        trainer = counted(trainer_cls)(
            model=tiny_gpt2(), args=args_cls(output_dir=str(tmp_path / side), **settings), train_dataset=token_rows()
        )
        trainer.train()
        out[side] = trainer
    assert type(out["ft"]).calls == type(out["hf"]).calls == 6  # 3 updates x 2 microbatches
    hf_params = dict(out["hf"].model.named_parameters())
    for name, p in out["ft"].model.named_parameters():
        torch.testing.assert_close(p.detach(), hf_params[name].detach(), **FLOAT64)
