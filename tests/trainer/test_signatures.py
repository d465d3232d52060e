"""ftrain's Trainer methods take transformers' arguments, so subclasses and scripts written for it keep working.

The reference is ``inspect.signature`` of the installed ``transformers.Trainer`` (5.x) for every method both classes
have, and transformers 4.57's signatures (written out below from its ``trainer.py``) for the methods 5.x removed
that ftrain keeps. Parameter names, kinds, order and defaults must be equal; ftrain's deliberate additions and the
methods other branches are still changing are listed, each with its reason, and nothing else may differ.
"""

from __future__ import annotations

import inspect

import pytest

from ftrain.trainer import Trainer

transformers = pytest.importorskip("transformers")

# ftrain's additions to transformers' parameters: extra trailing optional parameters, and defaults transformers
# does not give. The rest of each signature is checked.
EXTENSIONS = {
    "set_initial_training_values": {
        "extra": ("total_train_batch_size",),
        "why": "transformers 4.57 passed total_train_batch_size; 5.x computes it (None does that here)",
    },
    "store_flos": {"extra": ("inputs",), "why": "counts a step's microbatches first (the loop counts them itself)"},
    "get_decay_parameter_names": {"defaulted": ("model",), "why": "model defaults to self.model"},
    "_gather_and_numpify": {"defaulted": ("name",), "why": "name is an XLA tag ftrain does not use"},
}

# transformers 4.57.6 ``trainer.py`` signatures of methods that 5.x removed and ftrain keeps (annotations left out).
V4_SIGNATURES = {
    "_activate_neftune": "(self, model)",
    "_deactivate_neftune": "(self, model)",
    "_nested_gather": "(self, tensors, name=None)",
    "_gather_and_numpify": "(self, tensors, name)",
    "num_tokens": "(train_dl, max_steps=None)",
    "prediction_loop": "(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, "
    "metric_key_prefix='eval')",
    "torch_jit_model_eval": "(self, model, dataloader, training=False)",
    "_rotate_checkpoints": "(self, use_mtime=False, output_dir=None)",
    "_sorted_checkpoints": "(self, output_dir=None, checkpoint_prefix='checkpoint', use_mtime=False)",
}


def _methods(cls: type) -> dict[str, object]:
    out = {}
    for name in dir(cls):
        if name.startswith("__"):
            continue
        value = inspect.getattr_static(cls, name)
        if inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
            out[name] = getattr(cls, name)
    return out


def _shape(signature: inspect.Signature) -> list[tuple[str, str, object]]:
    return [(p.name, p.kind.name, p.default) for p in signature.parameters.values()]


def _without_extensions(name: str, shape: list[tuple[str, str, object]]) -> list[tuple[str, str, object]]:
    ext = EXTENSIONS.get(name, {})
    extra, defaulted = ext.get("extra", ()), ext.get("defaulted", ())
    trailing = [p for p in shape if p[0] in extra]
    assert shape[len(shape) - len(trailing) :] == trailing, f"{name}: ftrain's extra parameters must come last"
    assert all(p[2] is not inspect.Parameter.empty for p in trailing), f"{name}: extra parameters need defaults"
    return [(n, k, inspect.Parameter.empty if n in defaulted else d) for n, k, d in shape if n not in extra]


SHARED = sorted(set(_methods(transformers.Trainer)) & set(_methods(Trainer)))


@pytest.mark.parametrize("name", SHARED)
def test_signature_matches_transformers(name):
    theirs = _shape(inspect.signature(getattr(transformers.Trainer, name)))
    ours = _without_extensions(name, _shape(inspect.signature(getattr(Trainer, name))))
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(V4_SIGNATURES))
def test_signature_matches_transformers_4(name):
    assert not hasattr(transformers.Trainer, name) or name in SHARED
    ours = inspect.signature(getattr(Trainer, name))
    ours = ours.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in ours.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    expected = V4_SIGNATURES[name]
    if name in EXTENSIONS:  # compare without ftrain's additions
        shape = _without_extensions(name, _shape(ours))
        ours = ours.replace(
            parameters=[inspect.Parameter(n, getattr(inspect.Parameter, k), default=d) for n, k, d in shape]
        )
    assert str(ours) == expected


def test_the_lists_name_real_methods():
    """Every entry of the lists above names a method ftrain has (so a stale entry is noticed), and the signature
    checks cover transformers' methods that ftrain's Trainer has (none is left unchecked by accident)."""
    ours = _methods(Trainer)
    assert sorted(n for n in [*EXTENSIONS, *V4_SIGNATURES] if n not in ours) == []
    assert len(SHARED) >= 60
