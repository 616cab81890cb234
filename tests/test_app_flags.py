"""Yes/no options: one reading for --conf values, request fields and train options, and a clear
refusal of anything else (before, an unknown word silently meant "no")."""

from __future__ import annotations

import sys

import pytest

from app_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))

from lib.configs.medsam import _bool  # noqa: E402
from lib.flags import flag  # noqa: E402
from lib.trainers.medsam import _option  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("1", True), ("TRUE", True), (" yes ", True),
                                             ("on", True), ("0", False), ("False", False), ("no", False), ("off", False),
                                             (1, True), (0, False)])
def test_flag_reads_the_usual_spellings(value: object, expected: bool) -> None:
    assert flag(value, not expected) is expected


def test_flag_default_for_missing_and_refusal_of_other_words() -> None:
    assert flag(None, True) is True and flag("", False) is False
    for bad in ("maybe", "2", "tru", [True]):
        with pytest.raises(ValueError, match="true or false"):
            flag(bad, False)


def test_each_caller_names_the_option_it_refuses() -> None:
    assert _bool({"auto_score": "on"}, "auto_score") is True and _bool({}, "allow_remote") is False
    with pytest.raises(ValueError, match="--conf allow_remote must be true or false"):
        _bool({"allow_remote": "sometimes"}, "allow_remote")
    assert _option({"multi_gpu": "off"}, "multi_gpu", bool) is False
    with pytest.raises(MONAILabelException, match="train option multi_gpu must be bool"):
        _option({"multi_gpu": "perhaps"}, "multi_gpu", bool)
