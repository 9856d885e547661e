"""Examples: one type with a stable content id, and the loaders that make them.

    load_examples(path) -> list[Example]     JSONL, JSON, Parquet, CSV, a `save_to_disk` directory,
                                            a directory of split files, or a Hub dataset name
    save_examples(path, examples)           JSONL in the "datalever" schema (round-trips)
    find_overlap(named_sets) -> list[Overlap]   examples shared by splits (same id or prompt);
                                            overlap_error / check_overlap turn them into a DataError
    find_conflicts(source, examples, places)  one source's examples that ask the same question with different
                                            final answers; every loader counts them (on_conflict: warn | error)

One module per concern, each importing only the ones above it:

    base      Example, content_id, DataError, NO_SOURCE, the difficulty keys and levels
    readers   files, directories and Hub datasets -> located records, and every malformed-input error
    formats   schemas, default templates, plain rendering, detection, record -> Example, duplicates
    overlap   examples shared between splits
    conflicts the same question with different final answers (conflicting labels)
    load      DataFormat, load_examples / read_data, save_examples, local paths vs Hub names
    check     the `data check` command

Everything importable from `datalever.examples` before it became a package still is, from here.
"""

from datalever.examples.base import DIFFICULTY_KEYS, LEVELS, NO_SOURCE, DataError, Example, content_id
from datalever.examples.check import CheckConfig, run_check
from datalever.examples.conflicts import Conflicts, check_conflicts, find_conflicts
from datalever.examples.formats import (
    DEFAULT_TEMPLATES,
    PLAIN_ASSISTANT,
    ROLES,
    SCHEMAS,
    STRUCTURED_ROLES,
    Schema,
    detect_schema,
    plain_prompt,
    plain_turn,
)
from datalever.examples.load import (
    DataFormat,
    examples_written_by_datalever,
    load_examples,
    local_data,
    looks_local,
    read_data,
    save_examples,
)
from datalever.examples.overlap import (
    Overlap,
    check_overlap,
    find_overlap,
    normalize_prompt,
    overlap_error,
    prompt_core,
)
from datalever.examples.readers import FILE_READERS, Located, SplitRequest

__all__ = [
    "CheckConfig",
    "Conflicts",
    "DEFAULT_TEMPLATES",
    "DIFFICULTY_KEYS",
    "DataError",
    "DataFormat",
    "Example",
    "FILE_READERS",
    "LEVELS",
    "Located",
    "NO_SOURCE",
    "Overlap",
    "PLAIN_ASSISTANT",
    "ROLES",
    "SCHEMAS",
    "STRUCTURED_ROLES",
    "Schema",
    "SplitRequest",
    "check_conflicts",
    "check_overlap",
    "content_id",
    "detect_schema",
    "examples_written_by_datalever",
    "find_conflicts",
    "find_overlap",
    "load_examples",
    "local_data",
    "looks_local",
    "normalize_prompt",
    "overlap_error",
    "plain_prompt",
    "plain_turn",
    "prompt_core",
    "read_data",
    "run_check",
    "save_examples",
]
