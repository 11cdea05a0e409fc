"""Property test: arbitrary JSON values in config.json["upcycle"] never produce a traceback, only a
CheckpointError (exit 2, one line) naming the file, or a model that loads."""

from __future__ import annotations

import json
import shutil

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import upcycle  # noqa: E402
from upcycle.cli import main  # noqa: E402
from upcycle.recipes.bank_sparse.config import BankSparseConfig  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)
FIELDS = list(BankSparseConfig.__dataclass_fields__)
edits = st.dictionaries(st.sampled_from(FIELDS + ["junk"]), json_values, min_size=1, max_size=3)
envelope = st.fixed_dictionaries({}, optional={"format_version": json_values, "recipe": json_values})


@pytest.fixture(scope="module")
def base(tmp_path_factory, sparse_dir):
    return json.loads((sparse_dir / "config.json").read_text())


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(edit=edits, env=envelope)
def test_arbitrary_values_give_a_checkpoint_error_or_a_model(tmp_path_factory, sparse_dir, base, edit, env):
    ck = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(sparse_dir, ck)
    cfg = json.loads(json.dumps(base))
    cfg["upcycle"]["bank_sparse"].update(edit)
    cfg["upcycle"].update(env)
    (ck / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    try:
        upcycle.load(ck)
    except upcycle.CheckpointError as e:
        assert "config.json" in str(e) or str(ck) in str(e)
    rc = main(["info", str(ck), "--json"])
    assert rc in (0, 2)
