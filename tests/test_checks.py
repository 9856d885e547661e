import math

import pytest

from datalever import checks


@pytest.mark.parametrize(
    "check, value, ok",
    [
        (checks.positive, 1, True),
        (checks.positive, 0.5, True),
        (checks.positive, 0, False),
        (checks.positive, -1, False),
        (checks.positive, math.nan, False),
        (checks.positive, True, False),  # a bool is not a count
        (checks.non_negative, 0, True),
        (checks.non_negative, -0.1, False),
    ],
)
def test_number_checks_name_the_option_and_the_value(check, value, ok):
    if ok:
        check("batch_size", value)
    else:
        with pytest.raises(checks.ConfigError, match=r"^batch_size must be .*got "):
            check("batch_size", value)


def test_optional_none_and_choices_and_paths(tmp_path):
    checks.positive("max_steps", None, optional=True)
    with pytest.raises(checks.ConfigError):
        checks.positive("max_steps", None)
    checks.one_of("dtype", "bfloat16", ["float32", "bfloat16"])
    with pytest.raises(checks.ConfigError, match="dtype must be one of float32, bfloat16; got 'fp8'"):
        checks.one_of("dtype", "fp8", ["float32", "bfloat16"])
    checks.existing_path("data", str(tmp_path))
    with pytest.raises(checks.ConfigError, match="data: no such file or directory"):
        checks.existing_path("data", str(tmp_path / "nope"))
    checks.at_most("m", 10, 100)
    with pytest.raises(checks.ConfigError, match="m must be <= 100"):
        checks.at_most("m", 1000, 100)
