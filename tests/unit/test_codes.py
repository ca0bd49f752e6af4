"""The ten protocol codes are exactly docs/api.md's table, and each has its typed exception."""

import pytest

from allm.kernel import codes
from allm.kernel.codes import AllmError, Code, error_for

DESIGN_TABLE = {
    0: "OK",
    1: "OOM_VRAM",
    2: "OOM_RAM",
    3: "MODEL_CORRUPT",
    4: "TIMEOUT",
    5: "CANCELLED",
    6: "UNSUPPORTED",
    7: "INTERNAL",
    8: "FORMAT_MISMATCH",
    9: "LOAD_FAILED",
}


def test_codes_are_exactly_the_design_table():
    assert {c.value: c.name for c in Code} == DESIGN_TABLE


@pytest.mark.parametrize("code", [c for c in Code if c is not Code.OK])
def test_every_error_code_has_a_typed_exception(code):
    exc = error_for(code, "boom", reason="r", param="p")
    assert isinstance(exc, AllmError)
    assert exc.code is code
    assert type(exc) is not AllmError
    assert (exc.message, exc.reason, exc.param) == ("boom", "r", "p")


def test_ok_is_not_an_error():
    with pytest.raises(ValueError, match="not an error"):
        error_for(Code.OK, "fine")


def test_exception_classes_carry_distinct_codes():
    classes = [v for v in vars(codes).values() if isinstance(v, type) and issubclass(v, AllmError)]
    subclasses = [c for c in classes if c is not AllmError]
    assert len({c.code for c in subclasses}) == len(subclasses) == 9
