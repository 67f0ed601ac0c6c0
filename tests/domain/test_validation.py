from datetime import UTC, datetime

from app.contract.records import (
    Comparison,
    OracleKind,
    OracleSpec,
    TaskSpec,
    Validation,
    ValidationRequest,
    ValidationStatus,
)
from app.domain.validation import LABEL_ORACLE, oracle_for, shadow_version_for, unvalidated, validated

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def task(**fields) -> TaskSpec:
    return TaskSpec(name="spam", updated_at=NOW, **fields)


def request(output, status="ok", oracle=LABEL_ORACLE, version=2) -> ValidationRequest:
    return ValidationRequest(execution_id="e", request_id="r", task_id="spam", version=version, input={"t": 1},
                             output=output, status=status, oracle=oracle, requested_at=NOW)


def test_oracle_choice() -> None:
    external = OracleSpec(kind=OracleKind.EXTERNAL)
    assert oracle_for(task(), "spam") == LABEL_ORACLE
    assert oracle_for(task(), None) is None
    assert oracle_for(task(oracle=external), None) == external
    assert oracle_for(task(oracle=OracleSpec(kind=OracleKind.LABEL)), None) is None


def test_shadow_runs_the_configured_or_the_active_version() -> None:
    shadow = OracleSpec(kind=OracleKind.SHADOW)
    assert shadow_version_for(request("x", oracle=shadow, version=3), task(active_version=2)) == 2
    assert shadow_version_for(request("x", oracle=shadow, version=2), task(active_version=2)) is None
    pinned = OracleSpec(kind=OracleKind.SHADOW, shadow_version=1)
    assert shadow_version_for(request("x", oracle=pinned, version=2), task(active_version=2)) == 1


def test_validated_records_match_and_details() -> None:
    good = validated(request("spam"), "spam", NOW)
    assert good["match"] is True and good["status"] is ValidationStatus.VALIDATED and good["oracle_output"] == "spam"
    bad = validated(request("spam"), "ham", NOW)
    assert bad["match"] is False and "'spam' != 'ham'" in bad["details"]
    fuzzy = OracleSpec(kind=OracleKind.LABEL, comparison=Comparison.NORMALISED_TEXT)
    assert validated(request(" SPAM ", oracle=fuzzy), "spam", NOW)["match"] is True
    failed = validated(request(None, status="timeout"), "spam", NOW)
    assert failed["match"] is False and "timeout" in failed["details"]


def test_unvalidated_records_have_no_match() -> None:
    expired = unvalidated(request("spam"), ValidationStatus.EXPIRED, "no verdict within 60 s", NOW)
    assert expired["match"] is None and expired["status"] is ValidationStatus.EXPIRED


def test_records_are_every_validation_field_in_order() -> None:
    """What the codecs encode without a model (their tests hold encode_fields(r.model_dump()) to encode(r)):
    the very fields, values and order of the Validation they stand for."""
    shadow = OracleSpec(kind=OracleKind.SHADOW, comparison=Comparison.JSON_FIELDS)
    for fields in (validated(request({"label": "spam", "p": [0.5]}), {"label": "spam"}, NOW),
                   validated(request("spam", oracle=shadow), "ham", NOW),
                   unvalidated(request(None, status="error"), ValidationStatus.FAILED, "shadow failed", NOW)):
        assert list(fields) == list(Validation.model_fields)
        assert Validation(**fields).model_dump() == fields
