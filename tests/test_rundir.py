"""The run directory's writes: a directory appears whole or not at all; older outputs are replaced."""

from pathlib import Path

import pytest

from datalever import provenance, rundir


def test_atomic_dir_publishes_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with rundir.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing under the final name until the block ends
    assert (target / "a.txt").read_text() == "new"

    with pytest.raises(RuntimeError):
        with rundir.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "new"  # the old output stays
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and no temporary directory is left


def test_atomic_dir_replaces_or_keeps_what_is_there(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with rundir.atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with rundir.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_manifest_reads_back_as_id_to_multiplicity(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "multiplicity": [1, 3], "origin": ["original"] * 2}), tmp_path / "m")
    assert rundir.read_manifest(tmp_path / "m") == {"a": 1, "b": 3}


def test_settings_recorded_by_another_version_count_as_the_same_work():
    """An option added since, left at its default, and an option no longer there are no difference."""
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        lr: float = 0.1

    @dataclass
    class Now:
        epochs: int = 3
        added: str = "auto"
        inner: Inner = field(default_factory=Inner)

    recorded = {"epochs": 3, "removed": 1, "inner": {"lr": 0.1}}
    assert provenance.settings_differences(recorded, Now()) == []
    assert provenance.settings_differences(recorded, Now(added="none")) == ["added: None -> 'none'"]
    assert provenance.settings_differences(recorded, Now(inner=Inner(lr=0.2))) == ["inner.lr: 0.1 -> 0.2"]


def test_an_option_whose_default_changed_behaviour_counts_at_its_earlier_value():
    """chat_template: runs recorded before it existed rendered plain text ("none"), not the default "auto"."""
    from dataclasses import dataclass

    @dataclass
    class Now:
        chat_template: str = "auto"

    assert provenance.settings_differences({}, Now(chat_template="none")) == []
    assert provenance.settings_differences({}, Now()) == ["chat_template: None -> 'auto'"]


def test_defaults_of_a_nested_config_are_its_factorys():
    from datalever.profile import ProfileConfig

    assert provenance.field_defaults(ProfileConfig)["optim"]["lr"] == 2e-3  # the proxy's, not OptimConfig's 2e-5


SRC = Path(__file__).resolve().parents[1] / "src" / "datalever"
# Paths that are no run directory's: the layouts themselves, the preset cache and a model directory's HF files, the
# package's own assets, and a user's datasets directory as `datasets` lays it out.
OTHER_PATHS = {"rundir.py", "models.py", "demo.py", "examples/readers.py"}


@pytest.mark.parametrize(
    "module", sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if str(p.relative_to(SRC)) not in OTHER_PATHS)
)
def test_modules_build_no_paths_of_their_own(module):
    """Every file of a run directory is named in rundir.py: no other module joins a name onto a path itself
    (`dir / "name"`); it asks a layout class (RunDir, TrainDir, SplitDir, EvalDir, CheckpointDir, ModelDir, ...)."""
    import ast

    source = SRC / module
    joins = [
        node.lineno
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Div)
        and (isinstance(node.right, ast.JoinedStr) or isinstance(getattr(node.right, "value", None), str))
    ]
    assert not joins, f"{module} joins names onto paths at lines {joins}: name them in rundir.py"
