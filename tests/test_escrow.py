"""Rollback certificate escrow (TMAD 5.1(c), 15.10.3), in process, driven by the injectable clock.

Windows are inclusive calendar dates in Europe/London: every boundary test below names a UTC
instant and the London date it falls on. The app's clock (and the audit log's, which holds its
own reference) is replaced per test; nothing sleeps.
"""
from __future__ import annotations

import base64
import secrets
import threading
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select, text

from keysvc import escrow
from keysvc import store as st
from keysvc.anchors import Anchors
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from tests.conftest import OFFICER_1, S1SP
from tests.support.certs import NO_EXPIRY, der, make_ca, make_device_cert, pem

UTC = timezone.utc
LONDON = ZoneInfo("Europe/London")
CA_CERT, CA_KEY = make_ca("Test SMSO rollback CA")


# --------------------------------------------------------------------------- helpers
def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def set_clock(app, when: datetime) -> None:
    """Freeze the app at `when`: the App and its AuditLog each hold a clock."""
    app.clock = lambda: when
    app.audit.clock = app.clock


def new_chf() -> str:
    return "00-DB-" + "-".join(f"{b:02X}" for b in secrets.token_bytes(6))


def cert(not_after: datetime = NO_EXPIRY, chf: str = "00-DB-12-34-56-78-90-01"):
    return make_device_cert(CA_KEY, CA_CERT, chf, not_after=not_after)[0]


def deposit(app, *, valid_from: date, valid_to: date, chfs: list[str] | None = None,
            certificates: list[bytes] | None = None, max_releases: int = 0,
            note: str = "rollback", smso_id: str = "SMSO-1") -> str:
    return escrow.deposit(app, OFFICER_1, smso_id=smso_id, group_id="EA",
                          chf_identifiers=chfs or [new_chf()],
                          certificates=certificates or [der(cert())],
                          valid_from=valid_from, valid_to=valid_to,
                          max_releases=max_releases, note=note)


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(KeysvcError) as e:
        fn(*args, **kwargs)
    return e.value.code


def release(app, chf: str, reason: str = "migration rolled back"):
    return escrow.release(app, S1SP, chf, reason)


def window_verdict(app, now: datetime, valid_from: date, valid_to: date) -> str:
    """Deposit a window (well before `now`), then release at `now`: "RELEASED" or a code."""
    set_clock(app, utc(2025, 1, 1))
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=valid_from, valid_to=valid_to)
    set_clock(app, now)
    try:
        release(app, chf)
    except KeysvcError as e:
        return e.code
    return "RELEASED"


def rows(app, table) -> list[dict]:
    with app.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


def edit(app, sql: str, **params) -> None:
    """Change the database behind keysvc's back, as someone with DB access would."""
    with app.store.engine.begin() as conn:
        assert conn.execute(text(sql), params).rowcount >= 1


def seal_events(app) -> list:
    events, _ = app.audit.list(page_size=1000)
    return [e for e in events if e.code == "ESCROW_SEAL_INVALID"]


# --------------------------------------------------------------------------- London windows
# Summer (BST, UTC+1)
def test_release_at_2330_utc_on_30_june_is_outside_a_window_ending_30_june(app):
    # 23:30 UTC on 30 June is 00:30 BST on 1 July
    assert window_verdict(app, utc(2026, 6, 30, 23, 30), date(2026, 6, 1),
                          date(2026, 6, 30)) == "ESCROW_WINDOW_CLOSED"


def test_release_at_0030_london_on_the_start_date_is_inside_the_window(app):
    # 00:30 BST on 1 July is 23:30 UTC on 30 June
    assert window_verdict(app, utc(2026, 6, 30, 23, 30), date(2026, 7, 1),
                          date(2026, 7, 31)) == "RELEASED"


def test_last_instant_of_the_end_date_in_london_is_inside_the_window(app):
    # 23:59:59.999999 BST on 30 June
    assert window_verdict(app, utc(2026, 6, 30, 22, 59, 59, 999999), date(2026, 6, 1),
                          date(2026, 6, 30)) == "RELEASED"


def test_first_instant_after_the_end_date_in_london_is_outside_the_window(app):
    # 00:00 BST on 1 July
    assert window_verdict(app, utc(2026, 6, 30, 23, 0), date(2026, 6, 1),
                          date(2026, 6, 30)) == "ESCROW_WINDOW_CLOSED"


def test_last_instant_before_the_start_date_in_london_is_outside_the_window(app):
    # 23:59:59.999999 BST on 30 June
    assert window_verdict(app, utc(2026, 6, 30, 22, 59, 59, 999999), date(2026, 7, 1),
                          date(2026, 7, 31)) == "ESCROW_WINDOW_CLOSED"


def test_one_day_window_is_open_for_the_whole_london_day_only(app):
    day = date(2026, 7, 15)
    assert window_verdict(app, utc(2026, 7, 14, 23, 0), day, day) == "RELEASED"
    assert window_verdict(app, utc(2026, 7, 15, 22, 59, 59), day, day) == "RELEASED"
    assert window_verdict(app, utc(2026, 7, 14, 22, 59, 59), day, day) == "ESCROW_WINDOW_CLOSED"
    assert window_verdict(app, utc(2026, 7, 15, 23, 0), day, day) == "ESCROW_WINDOW_CLOSED"


# Winter (GMT, UTC+0)
def test_release_at_2330_utc_on_31_december_is_inside_a_window_ending_31_december(app):
    assert window_verdict(app, utc(2026, 12, 31, 23, 30), date(2026, 12, 1),
                          date(2026, 12, 31)) == "RELEASED"


def test_release_at_0030_utc_on_1_january_is_outside_a_window_ending_31_december(app):
    assert window_verdict(app, utc(2027, 1, 1, 0, 30), date(2026, 12, 1),
                          date(2026, 12, 31)) == "ESCROW_WINDOW_CLOSED"


def test_release_at_2330_utc_on_31_december_is_outside_a_window_starting_1_january(app):
    assert window_verdict(app, utc(2026, 12, 31, 23, 30), date(2027, 1, 1),
                          date(2027, 1, 31)) == "ESCROW_WINDOW_CLOSED"


# Clock change days: last Sunday of March (01:00 UTC, GMT -> BST) and of October (01:00 UTC,
# BST -> GMT); in 2026 they are 29 March and 25 October.
def test_release_at_0030_utc_on_29_march_is_inside_a_window_starting_29_march(app):
    # 00:30 GMT on 29 March, before the clocks go forward
    assert window_verdict(app, utc(2026, 3, 29, 0, 30), date(2026, 3, 29),
                          date(2026, 4, 30)) == "RELEASED"


def test_release_at_2330_utc_on_28_march_is_outside_a_window_starting_29_march(app):
    # 23:30 GMT on 28 March: winter, no offset yet
    assert window_verdict(app, utc(2026, 3, 28, 23, 30), date(2026, 3, 29),
                          date(2026, 4, 30)) == "ESCROW_WINDOW_CLOSED"


def test_release_at_2330_utc_on_29_march_is_outside_a_window_ending_29_march(app):
    # 00:30 BST on 30 March: the evening of the change day is already summer
    assert window_verdict(app, utc(2026, 3, 29, 23, 30), date(2026, 3, 1),
                          date(2026, 3, 29)) == "ESCROW_WINDOW_CLOSED"


def test_release_at_2259_utc_on_29_march_is_inside_a_window_ending_29_march(app):
    # 23:59 BST on 29 March
    assert window_verdict(app, utc(2026, 3, 29, 22, 59), date(2026, 3, 1),
                          date(2026, 3, 29)) == "RELEASED"


def test_release_at_2330_utc_on_24_october_is_inside_a_window_starting_25_october(app):
    # 00:30 BST on 25 October, before the clocks go back
    assert window_verdict(app, utc(2026, 10, 24, 23, 30), date(2026, 10, 25),
                          date(2026, 11, 30)) == "RELEASED"


def test_release_at_2330_utc_on_24_october_is_outside_a_window_ending_24_october(app):
    assert window_verdict(app, utc(2026, 10, 24, 23, 30), date(2026, 10, 1),
                          date(2026, 10, 24)) == "ESCROW_WINDOW_CLOSED"


def test_release_at_2330_utc_on_25_october_is_inside_a_window_ending_25_october(app):
    # 23:30 GMT on 25 October: the clocks went back at 01:00 UTC
    assert window_verdict(app, utc(2026, 10, 25, 23, 30), date(2026, 10, 1),
                          date(2026, 10, 25)) == "RELEASED"


def test_release_in_the_repeated_hour_on_25_october_is_on_25_october(app):
    # 00:30 UTC = 01:30 BST and 01:30 UTC = 01:30 GMT: both 25 October
    for now in (utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30)):
        assert window_verdict(app, now, date(2026, 10, 25), date(2026, 10, 25)) == "RELEASED"


def test_a_clock_in_another_zone_gives_the_same_london_date(app):
    # the same instant as 23:30 UTC on 30 June, read by a clock in New York
    ny = utc(2026, 6, 30, 23, 30).astimezone(ZoneInfo("America/New_York"))
    assert window_verdict(app, ny, date(2026, 6, 1), date(2026, 6, 30)) == \
        "ESCROW_WINDOW_CLOSED"
    assert window_verdict(app, ny, date(2026, 7, 1), date(2026, 7, 1)) == "RELEASED"


# --------------------------------------------------------------------------- deposit validation
def test_deposit_with_valid_to_before_valid_from_is_invalid_date_range(app):
    assert refusal(deposit, app, valid_from=date(2026, 7, 2),
                   valid_to=date(2026, 7, 1)) == "INVALID_DATE_RANGE"
    assert rows(app, st.escrows) == []


def test_deposit_without_a_date_is_invalid_date_range(app):
    assert refusal(deposit, app, valid_from=None, valid_to=date(2026, 7, 1)) == \
        "INVALID_DATE_RANGE"
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=None) == \
        "INVALID_DATE_RANGE"


def test_deposit_with_valid_to_equal_to_valid_from_is_accepted(app):
    assert deposit(app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 1))


@pytest.mark.parametrize("garbage", [b"", b"not a certificate", b"\x30\x03\x02\x01\x01",
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                     b"-----END CERTIFICATE-----\n"],
                         ids=["empty", "text", "truncated-der", "bad-pem"])
def test_deposit_of_a_certificate_that_does_not_parse_is_invalid_certificate(app, garbage):
    certificates = [der(cert()), garbage]
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=certificates) == "INVALID_CERTIFICATE"


def test_deposit_of_a_certificate_expiring_before_valid_to_is_invalid_certificate(app):
    c = cert(not_after=utc(2026, 7, 20))
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=[der(cert()), der(c)]) == "INVALID_CERTIFICATE"


def test_deposit_of_a_certificate_expiring_on_the_afternoon_of_valid_to_is_invalid_certificate(app):
    # 14:00 UTC = 15:00 BST on valid_to: the last hours of the window are not covered
    c = cert(not_after=utc(2026, 7, 31, 14, 0))
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=[der(c)]) == "INVALID_CERTIFICATE"


def test_deposit_of_a_certificate_expiring_at_2230_utc_on_valid_to_in_summer_is_invalid_certificate(app):  # noqa: E501 (the rule's name)
    # 23:30 BST on valid_to: not yet the end of the London day
    c = cert(not_after=utc(2026, 7, 31, 22, 30))
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=[der(c)]) == "INVALID_CERTIFICATE"


def test_deposit_of_a_certificate_valid_to_the_end_of_the_london_day_is_accepted(app):
    # summer: 23:00 UTC is 00:00 BST the next day; winter: midnight UTC is midnight GMT
    assert deposit(app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=[der(cert(not_after=utc(2026, 7, 31, 23, 0)))])
    assert deposit(app, valid_from=date(2026, 12, 1), valid_to=date(2026, 12, 31),
                   certificates=[der(cert(not_after=utc(2027, 1, 1, 0, 0)))])


def test_deposit_of_a_certificate_whose_not_after_is_the_last_second_of_valid_to_is_accepted(app):
    # RFC 5280 validity is inclusive: notAfter 23:59:59 (London) covers the whole day,
    # the convention the GB profile itself uses (99991231235959Z).
    assert deposit(app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   certificates=[der(cert(not_after=utc(2026, 7, 31, 22, 59, 59)))])
    assert deposit(app, valid_from=date(2026, 12, 1), valid_to=date(2026, 12, 31),
                   certificates=[der(cert(not_after=utc(2026, 12, 31, 23, 59, 59)))])


def test_deposit_of_a_certificate_expiring_at_2330_utc_on_valid_to_in_winter_is_invalid_certificate(app):  # noqa: E501 (the rule's name)
    # 23:30 GMT on 31 December: half an hour of the window is not covered
    c = cert(not_after=utc(2026, 12, 31, 23, 30))
    assert refusal(deposit, app, valid_from=date(2026, 12, 1), valid_to=date(2026, 12, 31),
                   certificates=[der(c)]) == "INVALID_CERTIFICATE"


@pytest.mark.parametrize("bad", ["00-DB-12-34-56-78-90", "00-DB-12-34-56-78-90-0G",
                                 "not an eui", "", "00:DB:12:34:56:78:90:01"])
def test_deposit_with_a_malformed_chf_identifier_is_invalid_eui64(app, bad):
    assert refusal(deposit, app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
                   chfs=[new_chf(), bad]) == "INVALID_EUI64"
    assert rows(app, st.escrows) == [] and rows(app, st.escrow_chfs) == []


def test_deposit_accepts_pem_and_der_and_release_returns_der(app):
    set_clock(app, utc(2026, 7, 10, 12))
    a, b = cert(), cert()
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31),
            certificates=[pem(a), der(b)])
    r = release(app, chf)
    assert r.certificates == (der(a), der(b))


def test_chf_identifiers_are_stored_canonically_and_any_spelling_releases(app):
    set_clock(app, utc(2026, 7, 10, 12))
    chf = new_chf()
    loose = chf.replace("-", "").lower()
    eid = deposit(app, chfs=[loose], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31))
    assert escrow.list_escrows(app, chf_identifier=chf)[0].chf_identifiers == (chf,)
    assert release(app, loose).escrow_id == eid
    assert release(app, chf).escrow_id == eid


def test_failed_deposit_stores_nothing(app):
    good = der(cert())
    for kwargs in ({"certificates": [good, b"junk"]},
                   {"certificates": [good, der(cert(not_after=utc(2026, 7, 2)))]},
                   {"chfs": [new_chf(), "bad"]},
                   {"valid_to": date(2026, 6, 1)}):
        args = {"valid_from": date(2026, 7, 1), "valid_to": date(2026, 7, 31), **kwargs}
        refusal(deposit, app, **args)
    assert rows(app, st.escrows) == []
    assert rows(app, st.escrow_chfs) == []


def test_deposit_is_one_transaction(app, monkeypatch):
    """When the second insert (the CHF index) fails, the escrow row is rolled back too."""
    import uuid
    fixed = uuid.UUID(int=0xE5C0)
    monkeypatch.setattr(escrow.uuid, "uuid4", lambda: fixed)
    eid = "esc-" + fixed.hex[:16]
    chf = new_chf()
    with app.store.tx() as conn:  # a leftover index row with the same key
        conn.execute(st.escrow_chfs.insert().values(escrow_id=eid, chf_identifier=chf))
    with pytest.raises(Exception):
        deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31))
    assert rows(app, st.escrows) == []


def test_deposit_records_the_depositing_officer_and_time(app):
    set_clock(app, utc(2026, 6, 1, 9))
    eid = deposit(app, valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 31))
    e = escrow.list_escrows(app)[0]
    assert (e.escrow_id, e.deposited_by, e.deposited_at) == (eid, OFFICER_1.identity,
                                                              utc(2026, 6, 1, 9))


# --------------------------------------------------------------------------- seal
def _deposit_for_seal(app, **kwargs) -> tuple[str, str]:
    set_clock(app, utc(2026, 7, 10, 12))
    chf = new_chf()
    eid = deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5),
                  **kwargs)
    return eid, chf


def _assert_refused_as_tampered(app, eid: str, chf: str, releases_before: int = 0) -> None:
    assert refusal(release, app, chf) == "ESCROW_SEAL_INVALID"
    events = seal_events(app)
    assert events, "the refusal must be an audit event"
    assert events[-1].target == eid and events[-1].actor == S1SP.identity
    assert events[-1].outcome == "ERROR"
    assert len(rows(app, st.escrow_releases)) == releases_before


OTHER_CERT = base64.b64encode(der(cert())).decode()
EDITS = {
    "valid_to": "UPDATE escrows SET valid_to='2099-12-31' WHERE id=:id",
    "valid_from": "UPDATE escrows SET valid_from='2000-01-01' WHERE id=:id",
    "max_releases": "UPDATE escrows SET max_releases=0 WHERE id=:id",
    "certificates": f"UPDATE escrows SET certificates='[\"{OTHER_CERT}\"]' WHERE id=:id",
    "chf_identifiers": "UPDATE escrows SET chf_identifiers='[\"00-DB-00-00-00-00-00-01\"]' "
                       "WHERE id=:id",
    "smso_id": "UPDATE escrows SET smso_id='SMSO-EVIL' WHERE id=:id",
    "group_id": "UPDATE escrows SET group_id='EB' WHERE id=:id",
    "note": "UPDATE escrows SET note='edited' WHERE id=:id",
    "deposited_by": "UPDATE escrows SET deposited_by='security-officer-2' WHERE id=:id",
    "deposited_at": "UPDATE escrows SET deposited_at='2020-01-01 00:00:00.000000' WHERE id=:id",
    "seal": "UPDATE escrows SET seal=:zero WHERE id=:id",
}


@pytest.mark.parametrize("field", list(EDITS))
def test_a_record_edited_in_the_database_is_refused_on_release_and_audited(app, field):
    eid, chf = _deposit_for_seal(app, max_releases=3)
    set_clock(app, utc(2026, 7, 3, 12))
    release(app, chf)  # an untouched record releases
    edit(app, EDITS[field], id=eid, zero=b"\x00" * 32)
    _assert_refused_as_tampered(app, eid, chf, releases_before=1)


@pytest.mark.parametrize("field", list(EDITS))
def test_a_record_edited_in_the_database_is_listed_as_not_sealed(app, field):
    eid, chf = _deposit_for_seal(app, max_releases=3)
    untouched, _ = _deposit_for_seal(app, max_releases=3)
    edit(app, EDITS[field], id=eid, zero=b"\x00" * 32)
    assert {e.escrow_id: e.seal_intact for e in escrow.list_escrows(app)} == {
        eid: False, untouched: True}


def test_listing_by_a_chf_only_the_index_names_lists_nothing(app):
    eid, chf = _deposit_for_seal(app)
    intruder = new_chf()
    edit(app, "INSERT INTO escrow_chfs (escrow_id, chf_identifier) VALUES (:id, :chf)",
         id=eid, chf=intruder)
    assert escrow.list_escrows(app, chf_identifier=intruder) == []
    assert [e.escrow_id for e in escrow.list_escrows(app, chf_identifier=chf)] == [eid]


def test_resetting_the_release_count_in_the_database_is_refused(app):
    eid, chf = _deposit_for_seal(app, max_releases=1)
    set_clock(app, utc(2026, 7, 3, 12))
    release(app, chf)
    edit(app, "UPDATE escrows SET releases=0 WHERE id=:id", id=eid)
    _assert_refused_as_tampered(app, eid, chf, releases_before=1)


def test_unrevoking_in_the_database_is_refused(app):
    eid, chf = _deposit_for_seal(app)
    escrow.revoke(app, OFFICER_1, eid)
    edit(app, "UPDATE escrows SET revoked=:f WHERE id=:id", id=eid, f=False)
    set_clock(app, utc(2026, 7, 3, 12))
    _assert_refused_as_tampered(app, eid, chf)


def test_a_chf_added_to_the_index_in_the_database_releases_nothing(app):
    """escrow_chfs is not sealed: the CHF must also be in the sealed record."""
    eid, chf = _deposit_for_seal(app)
    intruder = new_chf()
    edit(app, "INSERT INTO escrow_chfs (escrow_id, chf_identifier) VALUES (:id, :chf)",
         id=eid, chf=intruder)
    set_clock(app, utc(2026, 7, 3, 12))
    _assert_refused_as_tampered(app, eid, intruder)
    assert release(app, chf).escrow_id == eid  # the real CHF is unaffected


def _released_then_restored(app) -> tuple[str, str]:
    """A record released once, then put back in the database as it was before."""
    eid, chf = _deposit_for_seal(app, max_releases=1)
    (snapshot,) = rows(app, st.escrows)
    set_clock(app, utc(2026, 7, 3, 12))
    release(app, chf)
    edit(app, "UPDATE escrows SET releases=:r, seal=:s WHERE id=:id", id=eid,
         r=snapshot["releases"], s=snapshot["seal"])
    return eid, chf


def test_restoring_an_earlier_sealed_copy_of_the_record_is_refused(app):
    eid, chf = _released_then_restored(app)
    _assert_refused_as_tampered(app, eid, chf, releases_before=1)


def test_restoring_the_copy_from_before_a_revocation_is_refused(app):
    eid, chf = _deposit_for_seal(app)
    (snapshot,) = rows(app, st.escrows)
    escrow.revoke(app, OFFICER_1, eid)
    edit(app, "UPDATE escrows SET revoked=:f, seal=:s WHERE id=:id", id=eid, f=False,
         s=snapshot["seal"])
    set_clock(app, utc(2026, 7, 3, 12))
    _assert_refused_as_tampered(app, eid, chf)
    assert not escrow.list_escrows(app, chf_identifier=chf)[0].seal_intact


def anchors(app, eid: str) -> list[bytes]:
    """The seals the token anchors for this record (each anchor also names its CHFs)."""
    with app.partitions.admin.session() as s:
        return [v[:32] for v in hk.data_values(s, escrow.anchor_label(app, eid))]


def test_each_record_has_one_anchor_its_current_seal_after_every_change(app):
    eid, chf = _deposit_for_seal(app, max_releases=3)
    set_clock(app, utc(2026, 7, 3, 12))
    for change in (lambda: None, lambda: release(app, chf),
                   lambda: escrow.revoke(app, OFFICER_1, eid)):
        change()
        (row,) = rows(app, st.escrows)
        assert anchors(app, eid) == [row["seal"]]


def test_a_change_whose_clean_up_runs_after_the_next_change_leaves_that_ones_anchor(
        app, monkeypatch):
    """Release A commits; release B locks the row, anchors and commits; only then does A
    clean up. A removes only the seal it replaced, never B's."""
    eid, chf = _deposit_for_seal(app, max_releases=3)
    set_clock(app, utc(2026, 7, 3, 12))
    real, deferred = Anchors._forget, []

    def defer_the_first_clean_up(self, anchors, after):
        if after == "commit" and not deferred:
            deferred.append((self, anchors, after))
        else:
            real(self, anchors, after)
    monkeypatch.setattr(Anchors, "_forget", defer_the_first_clean_up)
    release(app, chf)  # A
    release(app, chf)  # B
    real(*deferred[0])  # A's clean-up, late
    (row,) = rows(app, st.escrows)
    assert anchors(app, eid) == [row["seal"]]
    assert release(app, chf).escrow_id == eid


def test_an_anchor_left_by_a_crash_goes_at_the_records_next_change(app, monkeypatch):
    eid, chf = _deposit_for_seal(app, max_releases=3)
    set_clock(app, utc(2026, 7, 3, 12))
    monkeypatch.setattr(Anchors, "_forget", lambda *a: None)  # the process died
    release(app, chf)
    assert len(anchors(app, eid)) == 2
    monkeypatch.undo()
    release(app, chf)
    (row,) = rows(app, st.escrows)
    assert anchors(app, eid) == [row["seal"]]


def test_a_record_deposited_before_anchors_existed_is_anchored_at_the_upgrade(app):
    eid, chf = _deposit_for_seal(app)
    with app.partitions.admin.session() as s:
        hk.destroy_data(s, escrow.anchor_label(app, eid))
    assert app.records.escrows.reanchor_legacy() == 1
    set_clock(app, utc(2026, 7, 3, 12))
    assert release(app, chf).escrow_id == eid


def test_a_record_with_a_wrong_anchor_is_not_re_anchored_at_the_upgrade(app):
    eid, chf = _released_then_restored(app)
    assert app.records.escrows.reanchor_legacy() == 0
    _assert_refused_as_tampered(app, eid, chf, releases_before=1)


def test_a_record_without_its_anchor_is_refused(app):
    eid, chf = _deposit_for_seal(app)
    with app.partitions.admin.session() as s:
        hk.destroy_data(s, escrow.anchor_label(app, eid))
    set_clock(app, utc(2026, 7, 3, 12))
    _assert_refused_as_tampered(app, eid, chf)


def test_a_release_whose_commit_fails_changes_neither_the_record_nor_its_anchor(app):
    eid, chf = _deposit_for_seal(app, max_releases=1)
    (before,) = rows(app, st.escrows)
    set_clock(app, utc(2026, 7, 3, 12))

    def fail(conn):
        raise RuntimeError("the database went away at commit")
    event.listen(app.store.engine, "commit", fail)
    try:
        with pytest.raises(RuntimeError):
            release(app, chf)
    finally:
        event.remove(app.store.engine, "commit", fail)
    assert rows(app, st.escrows) == [before] and anchors(app, eid) == [before["seal"]]
    assert release(app, chf).escrow_id == eid  # its one release is still there


def test_revoking_an_edited_record_is_refused_and_audited(app):
    eid, _ = _deposit_for_seal(app)
    edit(app, EDITS["valid_to"], id=eid)
    assert refusal(escrow.revoke, app, OFFICER_1, eid) == "ESCROW_SEAL_INVALID"
    assert seal_events(app)[-1].target == eid


def test_seal_survives_release_and_revoke(app):
    eid, chf = _deposit_for_seal(app, max_releases=5)
    set_clock(app, utc(2026, 7, 3, 12))
    for _ in range(3):
        release(app, chf)
    assert escrow.revoke(app, OFFICER_1, eid).revoked
    assert refusal(release, app, chf) == "ESCROW_NOT_FOUND"
    assert seal_events(app) == []


def test_seal_holds_with_a_clock_that_is_not_in_utc(app):
    """deposited_at is sealed: a clock in Europe/London must not make every record 'edited'."""
    set_clock(app, utc(2026, 7, 2, 12).astimezone(LONDON))
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    set_clock(app, utc(2026, 7, 3, 12).astimezone(LONDON))
    assert release(app, chf).certificates
    assert seal_events(app) == []
    (r,) = rows(app, st.escrow_releases)  # and the release time is the right instant
    assert (r["time"] if r["time"].tzinfo else r["time"].replace(tzinfo=UTC)) == \
        utc(2026, 7, 3, 12)


# --------------------------------------------------------------------------- constraints
def test_max_releases_is_enforced_and_releases_left_reported(app):
    set_clock(app, utc(2026, 7, 3, 12))
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5),
            max_releases=2)
    assert release(app, chf).releases_left == 1
    assert release(app, chf).releases_left == 0
    assert refusal(release, app, chf) == "ESCROW_EXHAUSTED"
    assert len(rows(app, st.escrow_releases)) == 2
    assert escrow.list_escrows(app, chf_identifier=chf)[0].releases == 2


def test_unlimited_escrow_reports_releases_left_as_minus_one(app):
    set_clock(app, utc(2026, 7, 3, 12))
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    assert [release(app, chf).releases_left for _ in range(3)] == [-1, -1, -1]


def test_two_concurrent_releases_of_the_last_remaining_one_exactly_one_succeeds(app):
    set_clock(app, utc(2026, 7, 3, 12))
    for round_ in range(4):
        chf = new_chf()
        eid = deposit(app, chfs=[chf], valid_from=date(2026, 7, 1),
                      valid_to=date(2026, 7, 5), max_releases=2)
        release(app, chf)  # one left
        barrier = threading.Barrier(2)
        results: list = []

        def go() -> None:
            barrier.wait()
            try:
                results.append(release(app, chf, f"race {round_}").releases_left)
            except KeysvcError as e:
                results.append(e.code)

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results, key=str) == [0, "ESCROW_EXHAUSTED"], results
        assert escrow.list_escrows(app, chf_identifier=chf)[0].releases == 2
        recorded = [r for r in rows(app, st.escrow_releases) if r["escrow_id"] == eid]
        assert len(recorded) == 2


def test_revoked_escrow_releases_nothing(app):
    set_clock(app, utc(2026, 7, 3, 12))
    chf = new_chf()
    eid = deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    revoked = escrow.revoke(app, OFFICER_1, eid, "superseded")
    assert revoked.revoked and revoked.escrow_id == eid
    assert refusal(release, app, chf) == "ESCROW_NOT_FOUND"
    assert rows(app, st.escrow_releases) == []
    assert escrow.list_escrows(app, chf_identifier=chf)[0].revoked


def test_revoking_an_unknown_escrow_is_escrow_not_found(app):
    assert refusal(escrow.revoke, app, OFFICER_1, "esc-nope") == "ESCROW_NOT_FOUND"


def test_every_release_is_recorded_with_actor_reason_and_time(app):
    chf = new_chf()
    set_clock(app, utc(2026, 6, 1))
    eid = deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    times = [utc(2026, 7, 1, 8, 15), utc(2026, 7, 4, 17, 45, 30)]
    for i, when in enumerate(times):
        set_clock(app, when)
        release(app, chf, f"rollback of FOC installation, ticket {i}")
    got = sorted(rows(app, st.escrow_releases), key=lambda r: r["id"])
    assert [(r["escrow_id"], r["actor"], r["reason"]) for r in got] == [
        (eid, "s1sp", "rollback of FOC installation, ticket 0"),
        (eid, "s1sp", "rollback of FOC installation, ticket 1")]
    stored = [r["time"] if r["time"].tzinfo else r["time"].replace(tzinfo=UTC) for r in got]
    assert stored == times


def test_refused_releases_record_nothing(app):
    chf = new_chf()
    set_clock(app, utc(2026, 7, 10))
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    assert refusal(release, app, chf) == "ESCROW_WINDOW_CLOSED"
    assert refusal(release, app, chf, "   ") == "INVALID_REQUEST"
    assert refusal(release, app, new_chf()) == "ESCROW_NOT_FOUND"
    assert refusal(release, app, "garbage") == "INVALID_EUI64"
    assert rows(app, st.escrow_releases) == []
    assert escrow.list_escrows(app, chf_identifier=chf)[0].releases == 0


def test_release_without_a_reason_is_refused(app):
    set_clock(app, utc(2026, 7, 3))
    chf = new_chf()
    deposit(app, chfs=[chf], valid_from=date(2026, 7, 1), valid_to=date(2026, 7, 5))
    assert refusal(release, app, chf, "") == "INVALID_REQUEST"


def test_list_escrows_filters_by_smso_and_chf(app):
    set_clock(app, utc(2026, 6, 1))
    a, b = new_chf(), new_chf()
    ea = deposit(app, chfs=[a], smso_id="SMSO-A", valid_from=date(2026, 7, 1),
                 valid_to=date(2026, 7, 5))
    eb = deposit(app, chfs=[b], smso_id="SMSO-B", valid_from=date(2026, 7, 1),
                 valid_to=date(2026, 7, 5), max_releases=4, note="n")
    assert [e.escrow_id for e in escrow.list_escrows(app)] == [ea, eb]
    assert [e.escrow_id for e in escrow.list_escrows(app, smso_id="SMSO-B")] == [eb]
    got = escrow.list_escrows(app, chf_identifier=a.lower())
    assert [e.escrow_id for e in got] == [ea]
    e = escrow.list_escrows(app, chf_identifier=b)[0]
    assert (e.max_releases, e.note, e.valid_from, e.valid_to) == (
        4, "n", date(2026, 7, 1), date(2026, 7, 5))
    assert refusal(escrow.list_escrows, app, chf_identifier="nope") == "INVALID_EUI64"


def test_deposit_with_valid_to_at_the_end_of_the_calendar_is_refused_not_a_crash(app):
    assert refusal(deposit, app, valid_from=date(2026, 7, 1),
                   valid_to=date(9999, 12, 31)) == "INVALID_DATE_RANGE"
