"""The data gate on real corpora: BBC News with its 101 duplicate groups, and the clean MR polarity set."""

from conftest import MR_CSV, needs_mr
from tasks.ingest import ingest
from tasks.validate import validate
from tuneflow.config import BUILTIN_BBC, DataConfig, ValidationConfig


def test_bbc_without_dedup_leaks_and_fix_repairs_it(tmp_path):
    data_dir = ingest(DataConfig(source=BUILTIN_BBC, dedup=False), tmp_path / "data").data_dir
    result = validate(data_dir, ValidationConfig(), tmp_path / "gate")
    checks = {check.name: check for check in result.checks}
    leak, within = checks["exact_leakage"], checks["duplicates_within_split"]
    assert not result.passed and not leak.passed and leak.evidence
    assert leak.value + within.value == 101 and "of 101 groups" in leak.reason  # the corpus's 101 duplicate groups

    fixed = validate(data_dir, ValidationConfig(fix=True), tmp_path / "fixed")
    assert fixed.passed and fixed.removed and all(item["split"] != "train" for item in fixed.removed)


@needs_mr
def test_mr_polarity_passes_without_errors_or_warnings(tmp_path):
    data_dir = ingest(DataConfig(source=str(MR_CSV)), tmp_path / "data").data_dir
    result = validate(data_dir, ValidationConfig(), tmp_path / "gate")
    assert result.passed
    assert [check.name for check in result.checks if not check.passed and check.severity in ("error", "warning")] == []
