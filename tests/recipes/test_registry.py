"""The recipe registry: config type -> recipe, name -> recipe, and clear errors for anything else."""

import pytest

import upcycle
from upcycle.recipes import registry
from upcycle.testing import tiny_model


def test_convert_dispatches_on_the_config_type():
    recipe = registry.for_config(upcycle.BankSparseConfig())
    assert recipe.name == "bank_sparse" and registry.get("bank_sparse") is recipe
    model = upcycle.convert(tiny_model(vocab_size=64), upcycle.BankSparseConfig(), progress=False)
    assert registry.for_model(model) is recipe
    assert registry.for_model(tiny_model(vocab_size=64)) is None


def test_unknown_configs_and_names_are_refused_with_the_choices():
    with pytest.raises(TypeError, match="not a recipe config.*BankSparseConfig"):
        upcycle.convert(tiny_model(vocab_size=64), {"keep": 16})
    with pytest.raises(ValueError, match="unknown upcycle recipe 'magic'.*bank_sparse"):
        registry.get("magic")


def test_every_builtin_recipe_bundle_is_complete():
    for r in registry.load_all():
        assert r.config_cls.__name__.endswith("Config") and callable(r.convert)
        assert callable(r.metadata) and callable(r.from_metadata) and callable(r.config_from_section)
        if r.cli is not None:
            assert set(r.cli.train_flags) <= {f for f in r.config_cls.__dataclass_fields__} | set(
                r.train_options_cls.__dataclass_fields__ if r.train_options_cls else ())


def test_a_third_party_recipe_registers_and_duplicates_are_refused():
    recipe = registry.get("bank_sparse")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Recipe(**{**recipe.__dict__, "summary": "another"}))
