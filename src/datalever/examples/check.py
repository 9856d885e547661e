"""The `data check` command: load a dataset as training would and report what was found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from datalever import provenance
from datalever.examples.base import NO_SOURCE
from datalever.examples.load import DataFormat, load_and_describe
from datalever.examples.readers import SplitRequest


@dataclass
class CheckConfig(DataFormat):
    """Load a dataset as training would, and report what was found (or exactly what is wrong)."""

    data: str | None = None
    """Dataset file or directory (JSONL, JSON, Parquet, CSV, a datasets directory) or hub dataset
    (`openai/gsm8k:main`); required."""
    split: str | None = None
    """Split to read from a DatasetDict directory or hub dataset."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("data is required: the dataset to check (--data FILE or a hub dataset)")


def run_check(cfg: CheckConfig) -> str:
    request = SplitRequest(cfg.split, None, "--split")  # as read_data reads it, with how it was read
    on_conflict = "error" if cfg.on_conflict == "error" else "ignore"  # warn: the report says it
    examples, how, conflicts = load_and_describe(
        cfg.data, cfg.schema, cfg.fields, cfg.template, request, "error", on_conflict
    )
    sources = Counter(ex.source or NO_SOURCE for ex in examples)
    lines = [
        f"{cfg.data}: {len(examples)} examples",
        f"schema: {how}",
        "sources: " + ", ".join(f"{k}={v}" for k, v in sources.most_common()),
        f"conflicting labels: {conflicts.summary()}",
        f"fingerprint: {provenance.fingerprint(examples)}",
    ]
    if examples:
        ex = examples[0]
        lines += ["first example:", f"  id: {ex.id}", f"  prompt: {ex.prompt!r}", f"  response: {ex.response!r}"]
    return "\n".join(lines)
