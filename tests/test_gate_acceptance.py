"""The data gate on real corpora: BBC News with its 101 duplicate groups, and the clean MR polarity set."""

from conftest import MR_CSV, needs_mr
from tasks.ingest import ingest
from tasks.validate import validate
from tuneflow.config import BUILTIN_BBC, DataConfig, ValidationConfig


def test_bbc_without_dedup_keeps_repeats_together_and_fix_repairs_near_duplicate_leaks(tmp_path):
    data_dir = ingest(DataConfig(source=BUILTIN_BBC, dedup=False), tmp_path / "data").data_dir
    result = validate(data_dir, ValidationConfig(), tmp_path / "gate")
    checks = {check.name: check for check in result.checks}
    leak, within = checks["exact_leakage"], checks["duplicates_within_split"]
    # the stable split keeps a text's repeats in one split: the corpus's 101 duplicate groups never leak exactly ...
    assert leak.passed and leak.value == 0 and "of 101 groups" in leak.reason and within.value == 101
    # ... but re-published stories with small edits (near-duplicates) land across splits
    assert not result.passed and not checks["near_dup_leakage"].passed and checks["near_dup_leakage"].evidence

    fixed = validate(data_dir, ValidationConfig(fix=True), tmp_path / "fixed")
    assert fixed.passed and fixed.removed and all(item["split"] != "train" for item in fixed.removed)


@needs_mr
def test_mr_polarity_passes_without_errors_or_warnings(tmp_path):
    data_dir = ingest(DataConfig(source=str(MR_CSV)), tmp_path / "data").data_dir
    result = validate(data_dir, ValidationConfig(), tmp_path / "gate")
    assert result.passed
    assert [check.name for check in result.checks if not check.passed and check.severity in ("error", "warning")] == []
