"""`datalever split --trajectories FILE`: a split from loss trajectories computed by another tool, fed to upsample
and, in the slow test, to TRL's SFTTrainer as docs/interop.md shows.

Expectations are built by hand: two groups of trajectories far apart (flat near 3.0 against falling from 1.0), so
the hard set is known by construction; multiplicities are 1 + m for exactly those ids.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datalever import cli, rundir, synth
from datalever.checks import ConfigError
from datalever.examples import load_examples
from datalever.split import SplitConfig, SplitError, run
from datalever.upsample import UpsampleConfig
from datalever.upsample import run as upsample

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_HARD = 16, 5
COLUMNS = ["loss_10", "loss_20", "loss_30"]


pytestmark = pytest.mark.usefixtures("fast_provenance")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    """The embedded generator's GSM8K-style data; its ids are content hashes, as another tool would copy them."""
    files = synth.write_splits(str(tmp_path_factory.mktemp("data")), n_train=N_TRAIN, n_val=4, n_test=4, seed=0)
    return files["train"]


def train_ids(train_file: str) -> list[str]:
    return [ex.id for ex in load_examples(train_file)]


def two_groups(ids: list[str], hard: set[str]) -> dict[str, list[float]]:
    """Hard rows stay near 3.0, easy rows fall from 1.0: two groups no clustering can mix up."""
    rng = np.random.default_rng(0)
    losses = {c: [] for c in COLUMNS}
    for i in ids:
        curve = [3.0, 2.95, 2.9] if i in hard else [1.0, 0.6, 0.3]
        for c, v in zip(COLUMNS, curve):
            losses[c].append(v + rng.normal(0, 0.02))
    return losses


def write_external(path: Path, ids: list[str], losses: dict[str, list], **extra) -> str:
    pq.write_table(pa.table({"id": ids, **extra, **losses}), path)
    return str(path)


def hard_set(train_file: str) -> set[str]:
    return set(train_ids(train_file)[:N_HARD])


def split_rows(out: Path) -> dict[str, bool]:
    df = pq.read_table(out / "split.parquet").to_pandas()
    return dict(zip(df["id"], df["hard"]))


# ------------------------------------------------------------------------------ the split


def test_external_file_gives_the_hard_group_it_was_made_with(tmp_path, train_file):
    ids = train_ids(train_file)
    hard = hard_set(train_file)
    ext = write_external(tmp_path / "elsewhere.parquet", ids, two_groups(ids, hard))
    run_dir = tmp_path / "run"
    s = run(SplitConfig(run_dir=str(run_dir), trajectories=ext, data=train_file))
    assert not (tmp_path / "elsewhere.meta.json").exists()  # no meta file was needed
    assert split_rows(run_dir) == {i: i in hard for i in ids}
    assert s["n_hard"] == N_HARD and s["n_easy"] == N_TRAIN - N_HARD and s["n_flagged_excluded"] == 0
    assert s["steps"] == [10, 20, 30]  # from the column names
    assert s["trajectories"] == ext
    assert "difficulty" in s  # the training file's meta (level, steps) is summarized as for a profile
    df = pq.read_table(run_dir / "split.parquet").to_pandas()
    assert [c for c in df.columns if c.startswith("feat_")] == [f"feat_loss_step{s:06d}" for s in (10, 20, 30)]
    for png in ("split_trajectories.png", "split_datamap.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((run_dir / "split.meta.json").read_text())
    assert len(meta["trajectories_sha256"]) == 64
    assert run(SplitConfig(run_dir=str(run_dir), trajectories=ext, data=train_file)) == s  # same work again


def test_source_and_flag_columns_are_used(tmp_path, train_file):
    """A flagged row may have NaN losses: it is left out of clustering and kept once, as with a profile."""
    ids = train_ids(train_file)
    hard = hard_set(train_file)
    losses = two_groups(ids, hard)
    for c in COLUMNS:
        losses[c][-1] = float("nan")
    flags = [""] * (N_TRAIN - 1) + ["truncated"]
    ext = write_external(tmp_path / "t.parquet", ids, losses, source=["gsm"] * N_TRAIN, flag=flags)
    s = run(SplitConfig(run_dir=str(tmp_path / "run"), trajectories=ext, data=train_file))
    assert s["n_flagged_excluded"] == 1 and s["flag_counts"] == {"truncated": 1}
    df = pq.read_table(tmp_path / "run" / "split.parquet").to_pandas()
    assert set(df["source"]) == {"gsm"} and df.loc[df["id"] == ids[-1], "assigned"].item() == "flagged"


def test_ids_that_do_not_match_the_training_file_are_refused_by_name(tmp_path, train_file):
    ids = train_ids(train_file)
    stranger = "feedfacefeedface"
    kept = ids[:-2] + [stranger]  # the last two training examples lack a trajectory; one id is unknown
    ext = write_external(tmp_path / "t.parquet", kept, two_groups(kept, hard_set(train_file)))
    with pytest.raises(SplitError) as err:
        run(SplitConfig(run_dir=str(tmp_path / "run"), trajectories=ext, data=train_file))
    msg = str(err.value)
    assert "1 id(s) of the trajectories are not training examples" in msg and stranger in msg
    assert "2 training example(s) have no trajectory" in msg and ids[-2] in msg and ids[-1] in msg
    assert not (tmp_path / "run" / "split.parquet").exists()


def bad_files(ids: list[str]) -> dict[str, tuple[dict, str]]:
    """name -> (columns, what the error must say)"""
    good = {"loss_1": [1.0] * len(ids), "loss_2": [0.5] * len(ids)}
    nan = [1.0] * len(ids)
    nan[3] = nan[7] = float("nan")
    return {
        "text loss": ({"id": ids, **good, "note": ["x"] * len(ids)}, r"column 'note' is string, not numeric"),
        "bool loss": ({"id": ids, **good, "ok": [True] * len(ids)}, r"column 'ok' is bool, not numeric"),
        "no id": (good, r"no 'id' column"),
        "no losses": ({"id": ids, "n_tokens": [3] * len(ids)}, r"no loss columns"),
        "duplicate id": ({"id": ids[:-1] + ids[:1], **good}, rf"1 duplicate id\(s\), e\.g\. \['{ids[0]}'\]"),
        "null id": ({"id": ids[:-1] + [None], **good}, r"1 null id\(s\)"),
        "int id": ({"id": list(range(len(ids))), **good}, r"column 'id' is int64, not text"),
        "NaN row": ({"id": ids, **good, "loss_3": nan}, rf"2 unflagged row\(s\) .*\['{ids[3]}', '{ids[7]}'\]"),
        "null loss": ({"id": ids, **good, "loss_3": [None] + [1.0] * (len(ids) - 1)}, r"1 unflagged row"),
    }


@pytest.mark.parametrize(
    "case",
    ["text loss", "bool loss", "no id", "no losses", "duplicate id", "null id", "int id", "NaN row", "null loss"],
)
def test_unusable_files_are_refused_naming_file_and_problem(tmp_path, train_file, case):
    columns, match = bad_files(train_ids(train_file))[case]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(SplitError, match=match) as err:
        run(SplitConfig(run_dir=str(tmp_path / "run"), trajectories=str(path), data=train_file))
    assert str(path) in str(err.value)


def test_empty_and_non_parquet_files_are_refused(tmp_path, train_file):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "loss_1": pa.array([], pa.float64())}), empty)
    with pytest.raises(SplitError, match="empty file"):
        run(SplitConfig(run_dir=str(tmp_path / "run"), trajectories=str(empty), data=train_file))
    text = tmp_path / "losses.parquet"
    text.write_text("id,loss\n")
    with pytest.raises(SplitError, match="cannot read it as Parquet"):
        run(SplitConfig(run_dir=str(tmp_path / "run"), trajectories=str(text), data=train_file))
    with pytest.raises(ConfigError, match="trajectories: no such file"):
        SplitConfig(trajectories=str(tmp_path / "missing.parquet"))


def test_rerun_with_other_trajectories_is_refused_unless_overwrite(tmp_path, train_file):
    ids = train_ids(train_file)
    first = write_external(tmp_path / "a.parquet", ids, two_groups(ids, set(ids[:N_HARD])))
    other_hard = set(ids[-3:])
    second = write_external(tmp_path / "b.parquet", ids, two_groups(ids, other_hard))
    run_dir = str(tmp_path / "run")
    run(SplitConfig(run_dir=run_dir, trajectories=first, data=train_file))
    # Another file: the option differs.
    with pytest.raises(ConfigError, match=r"other settings \(trajectories: .*a\.parquet' -> .*b\.parquet'\)"):
        run(SplitConfig(run_dir=run_dir, trajectories=second, data=train_file))
    # The same name, rewritten with other losses: the recorded content differs.
    write_external(tmp_path / "a.parquet", ids, two_groups(ids, other_hard))
    with pytest.raises(ConfigError, match=r"a\.parquet has other content"):
        run(SplitConfig(run_dir=run_dir, trajectories=first, data=train_file))
    assert split_rows(tmp_path / "run") == {i: i in ids[:N_HARD] for i in ids}  # untouched by the refusals
    run(SplitConfig(run_dir=run_dir, trajectories=second, data=train_file, overwrite=True))
    assert split_rows(tmp_path / "run") == {i: i in other_hard for i in ids}


def test_external_split_feeds_upsample(tmp_path, train_file):
    ids = train_ids(train_file)
    hard = hard_set(train_file)
    ext = write_external(tmp_path / "t.parquet", ids, two_groups(ids, hard))
    run_dir = str(tmp_path / "run")
    run(SplitConfig(run_dir=run_dir, trajectories=ext, data=train_file))
    counts = upsample(UpsampleConfig(run_dir=run_dir, distribution="hard", m=2, data=train_file))
    arm = rundir.RunDir(run_dir).arm("hard")
    assert rundir.read_manifest(arm.manifest) == {i: 3 if i in hard else 1 for i in ids}
    lines = [json.loads(line) for line in arm.train_jsonl.read_text().splitlines()]
    assert Counter(r["id"] for r in lines) == {i: 3 if i in hard else 1 for i in ids}
    assert counts["n_rows"] == N_TRAIN + 2 * N_HARD


def test_the_documented_command_line(tmp_path, train_file, capsys):
    ids = train_ids(train_file)
    ext = write_external(tmp_path / "t.parquet", ids, two_groups(ids, hard_set(train_file)))
    run_dir = str(tmp_path / "run")
    cli.main(["split", "--run_dir", run_dir, "--trajectories", ext, "--data", train_file])
    assert f"{N_HARD} hard and {N_TRAIN - N_HARD} easy examples" in capsys.readouterr().out
    assert split_rows(Path(run_dir)) == {i: i in hard_set(train_file) for i in ids}


# ------------------------------------------------------------------------------ TRL (docs/interop.md)


def doc_snippet(name: str) -> str:
    """The Python block of docs/interop.md that follows the marker comment `<!-- test: NAME -->`."""
    text = (ROOT / "docs" / "interop.md").read_text()
    found = re.search(rf"<!-- test: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"docs/interop.md has no python block marked {name!r}"
    return found.group(1)


@pytest.mark.slow
def test_trl_sft_trainer_recipe_trains_on_the_upsampled_arm(tmp_path, train_file, monkeypatch):
    trl = pytest.importorskip("trl")
    from datalever.models import resolve_model

    ids = train_ids(train_file)
    hard = hard_set(train_file)
    run_dir = str(tmp_path / "run")
    ext = write_external(tmp_path / "t.parquet", ids, two_groups(ids, hard))
    run(SplitConfig(run_dir=run_dir, trajectories=ext, data=train_file))
    upsample(UpsampleConfig(run_dir=run_dir, distribution="hard", m=1, data=train_file))
    arm = rundir.RunDir(run_dir).arm("hard")

    # The documented recipe as written, with only the paths and the length of training changed.
    code = doc_snippet("trl")
    code = re.sub(r'^arm_dir = Path\(".*?"\)', f"arm_dir = Path({str(arm.root)!r})", code, count=1, flags=re.M)
    code = re.sub(r'^model_name = ".*?"', f"model_name = {resolve_model('preset:tiny', seed=0)!r}", code, flags=re.M)
    real_config = trl.SFTConfig
    short = dict(max_steps=3, bf16=False, save_strategy="no", logging_steps=1, report_to="none", use_cpu=True)
    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: real_config(**{**kw, **short}))
    scope: dict = {}
    exec(compile(code, "docs/interop.md", "exec"), scope)

    # Each example appears as often as its multiplicity: hard ones twice (m=1), the rest once.
    by_prompt = {ex.prompt: ex.id for ex in load_examples(train_file)}
    assert Counter(by_prompt[p] for p in scope["train"]["prompt"]) == {i: 2 if i in hard else 1 for i in ids}
    trainer = scope["trainer"]
    assert trainer.state.global_step == 3
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # Completion-only loss is TRL's default for prompt/completion data: the prompt's labels are masked (-100), a
    # prefix of each row, and the completion, with the EOS token TRL appends, is learned.
    labels = trainer.train_dataset[0]["labels"]
    n_masked = labels.count(-100)
    assert n_masked > 0 and labels[:n_masked] == [-100] * n_masked
    assert labels[-1] == trainer.processing_class.eos_token_id
