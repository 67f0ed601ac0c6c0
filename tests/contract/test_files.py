"""The contract folders are found in a source checkout and in an installed wheel's layout, and a missing one is
named."""

from pathlib import Path

import pytest

from app.contract import files
from app.contract.files import contract_dir

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_finds_the_repository_folders() -> None:
    assert contract_dir("schemas") == REPO / "schemas"
    assert (contract_dir("schemas") / "ExecutionRequest.avsc").is_file()
    assert (contract_dir("topics") / "topics.yaml").is_file()


def test_a_wheel_finds_them_inside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed, the package's contract/ has no repository around it: the folders ship as app/_contract/."""
    here = tmp_path / "site-packages" / "app" / "contract"
    here.mkdir(parents=True)
    (tmp_path / "site-packages" / "app" / "_contract" / "schemas").mkdir(parents=True)
    monkeypatch.setattr(files, "_HERE", here)
    contract_dir.cache_clear()
    try:
        assert contract_dir("schemas") == tmp_path / "site-packages" / "app" / "_contract" / "schemas"
        with pytest.raises(FileNotFoundError, match="'topics' not found"):
            contract_dir("topics")
    finally:
        contract_dir.cache_clear()
