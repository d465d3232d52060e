"""Recipes: built-ins load with their types, YAML and command-line overrides are checked, the optimizer a recipe
builds matches torch.optim + transformers' scheduler step by step."""

import pytest
import torch
from tolerances import FLOAT64

from ftrain.cli import parse_train
from ftrain.cli.train import make_optimizer
from ftrain.recipes import RecipeError, builtin_recipes, dump, load_recipe
from ftrain.recipes.digits import DigitsRecipe
from ftrain.recipes.gpt import GPTRecipe, text_windows


def test_builtin_recipes_load_with_their_types():
    assert builtin_recipes() == ["digits", "gpt"]
    gpt, digits = load_recipe("gpt"), load_recipe("digits")
    assert isinstance(gpt, GPTRecipe) and isinstance(digits, DigitsRecipe)
    assert (gpt.model.n_layer, gpt.model.d_model, gpt.train.steps, gpt.optim.betas) == (4, 128, 300, (0.9, 0.999))
    assert (digits.model.hidden, digits.train.batch_size, digits.schedule.name) == ((128,), 64, "linear")


def test_recipe_yaml_round_trip(tmp_path):
    recipe, _, _ = parse_train(["gpt", "--optim.lr", "0.01", "--checkpoint.keep", "None", "--data.stride", "7"])
    path = tmp_path / "mine.yaml"
    path.write_text(dump(recipe))
    assert load_recipe(str(path)) == recipe
    assert (recipe.optim.lr, recipe.checkpoint.keep, recipe.data.stride) == (0.01, None, 7)


def test_command_line_overrides_are_typed():
    recipe, resume, nproc = parse_train(
        ["digits", "--train.steps", "7", "--optim.betas", "0.8", "0.95", "--model.hidden", "32", "16", "--resume"]
    )
    assert (recipe.train.steps, recipe.optim.betas, recipe.model.hidden, resume, nproc) == (
        7, (0.8, 0.95), (32, 16), True, 1,
    )  # fmt: skip
    assert recipe.optim.lr == load_recipe("digits").optim.lr  # untouched keys keep the YAML's values


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("task: gpt\ntrain: {stepz: 3}\n", "recipe key 'train.stepz' is unknown (did you mean 'steps'?)"),
        ("task: gpt\ntrain: {steps: ten}\n", "recipe key 'train.steps' must be int, got 'ten' (str)"),
        ("task: gpt\noptim: {betas: [0.9]}\n", "recipe key 'optim.betas' must be a list of 2 values"),
        ("task: gpt\ntrain: {steps: 0}\n", "train.steps: must be >= 1, got 0"),
        ("task: gtp\n", "unknown task 'gtp'; the tasks are digits, gpt"),
        ("train: {steps: 3}\n", "a recipe is a mapping with a 'task' key"),
        ("task: gpt\nschedule: {name: cosin}\n", "schedule.name: unknown schedule 'cosin'"),
        ("task: gpt\nschedule: {name: greedy}\n", "schedule.name: unknown schedule 'greedy'"),  # metric-driven
        ("task: gpt\nparallel: {tp: 0}\n", "parallel: ParallelConfig.tp must be an int >= 1, got 0"),
    ],
)
def test_bad_recipe_file_names_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert message in str(info.value)


def test_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(RecipeError, match=r"unknown recipe 'digit' \(did you mean 'digits'\?\)"):
        load_recipe("digit")


def test_text_windows_cover_the_splits_without_overlap_in_validation():
    data = torch.arange(1000)
    train, val = text_windows(data, seq_len=10, stride=5, val_fraction=0.1)
    assert train["input_ids"].shape == (179, 10) and val["input_ids"].shape == (10, 10)
    assert torch.equal(val["input_ids"].flatten(), torch.arange(900, 1000))  # validation = the last 10%, in order
    assert int(train["input_ids"].max()) == 899  # no training window reaches into validation


def test_recipe_optimizer_matches_torch_adamw_clip_and_hf_cosine_schedule():
    transformers = pytest.importorskip("transformers")
    recipe, _, _ = parse_train(
        ["gpt", "--train.steps", "8", "--optim.lr", "0.05", "--optim.weight-decay", "0.1", "--optim.clip", "0.5",
         "--schedule.name", "cosine", "--schedule.warmup-steps", "2"]
    )  # fmt: skip
    # float64 on both sides: the claim is mathematical (the same AdamW, clipping and schedule), and in float32 Adam
    # turns the two sides' last-bit differences into ±lr on elements whose gradient is rounding noise (issue 12).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).double()
    ref.load_state_dict(model.state_dict())
    tx = make_optimizer(recipe, model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    decay = [p for n, p in ref.named_parameters() if n in ("0.weight", "2.weight")]  # HF: no decay for bias / LN
    rest = [p for n, p in ref.named_parameters() if n not in ("0.weight", "2.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=0.05)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        sched.step()
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, leaves, (x,)), y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        updates, state = tx.update(grads, state, params)
        params = {k: (params[k] + updates[k]).detach() for k in params}
    for name, p in ref.named_parameters():
        assert params[name].dtype == torch.float64
        torch.testing.assert_close(params[name], p.detach(), **FLOAT64)


def test_recipe_optimizer_is_the_trainers_for_the_same_settings():
    """Both build with ftrain.optim.make_optimizer: the same adamw, decay groups, clipping and schedule from a recipe
    and from TrainingArguments give bitwise the same updates (the same chain, the same kernels)."""
    pytest.importorskip("transformers")
    from ftrain.trainer.args import TrainingArguments
    from ftrain.trainer.convert import make_optimizer as trainer_optimizer

    recipe, _, _ = parse_train(
        ["gpt", "--train.steps", "6", "--optim.lr", "0.05", "--optim.weight-decay", "0.1", "--optim.clip", "0.5",
         "--schedule.name", "cosine", "--schedule.warmup-steps", "2"]
    )  # fmt: skip
    args = TrainingArguments(
        "out", optim="adamw_torch", learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.5,
        lr_scheduler_type="cosine", warmup_steps=2,
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    sides = [make_optimizer(recipe, model), trainer_optimizer(args, model, num_training_steps=6)]
    states, outs = [tx.init(params) for tx in sides], [dict(params), dict(params)]
    torch.manual_seed(0)
    for _ in range(6):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        for i, tx in enumerate(sides):
            updates, states[i] = tx.update(grads, states[i], outs[i])
            outs[i] = {k: outs[i][k] + updates[k] for k in params}
    for name in params:
        assert not torch.equal(outs[0][name], params[name])
        assert torch.equal(outs[0][name], outs[1][name]), name
