"""Hostile XML: refused by name, before it costs anything, and the server keeps serving.

Outer-file attacks go through the real server (INVALID_ARGUMENT with the api.md reason),
then a health check and a good call show it still serves; the size limit and attacks
hidden inside the encrypted plaintext run in process.
"""
from __future__ import annotations

import base64
import dataclasses
import re
import socket
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc import s1sp
from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.errors import KeysvcError
from tests.conftest import EXAMPLES, S1SP
from tests.support.encoder import duplicate, plaintext_xml, set_text
from tests.test_s1sp_validation import CONTENT_CV, EK_CV, count, kit  # noqa: F401

GOOD = (EXAMPLES / "ea-kw" / "file.xml").read_bytes()
DECL = b"<?xml version='1.0' encoding='UTF-8'?>\n"
ROOT_OPEN = GOOD[len(DECL):GOOD.index(b">", len(DECL)) + 1]
MKE_CV = "//m:MasterKeyEntry/xenc:EncryptedKey/xenc:CipherData/xenc:CipherValue"
assert GOOD.startswith(DECL)


def after_decl(doctype: bytes, body: bytes = GOOD) -> bytes:
    return DECL + doctype + b"\n" + body[len(DECL):]


def billion_laughs(root: bytes = b"MigrationGroupEncryptedFile") -> bytes:
    ents = [b'<!ENTITY lol "lol">'] + [
        b"<!ENTITY lol%d \"%s\">" % (i, b"".join(b"&lol%s;" % (str(i - 1).encode() if i > 1
                                                                else b"") for _ in range(10)))
        for i in range(1, 10)]
    return (b"<!DOCTYPE " + root + b" [" + b"".join(ents) + b"]>")


def with_originator(body: bytes, text: bytes) -> bytes:
    return re.sub(rb"<OriginatorID>[^<]*</OriginatorID>", b"<OriginatorID>" + text +
                  b"</OriginatorID>", body, count=1)


def nested(depth: int) -> bytes:
    """The example with `depth` extra levels inside its header."""
    inner = b"<x>" * depth + b"</x>" * depth
    return GOOD.replace(b"</MigrationHeader>", inner + b"</MigrationHeader>", 1)


def cipher_text(data: bytes, path: str) -> str:
    from lxml import etree

    from tests.support.encoder import NSMAP
    return etree.fromstring(data).xpath(path, namespaces=NSMAP)[0].text.strip()


def non_canonical(b64: str) -> str:
    """Same bytes, but the unused bits before the '=' padding set: decoders that do not
    check would accept it, and two spellings of one value are an ambiguity."""
    assert b64.endswith("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = b64.rstrip("=")
    last = alphabet.index(body[-1]) | 1
    out = body[:-1] + alphabet[last] + "=" * (len(b64) - len(body))
    assert base64.b64decode(out) == base64.b64decode(b64) and out != b64
    return out


def ek_cv_padded(data: bytes) -> str:
    # a kw-wrapped 256-bit content key is 40 bytes: base64 ends in "="
    return cipher_text(data, EK_CV)


HOSTILE = {
    # DTDs and entities
    "billion-laughs": (after_decl(billion_laughs(), with_originator(GOOD, b"&lol9;")),
                       "FORBIDDEN_XML_CONSTRUCT"),
    "external-entity": (after_decl(
        b'<!DOCTYPE MigrationGroupEncryptedFile [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
        with_originator(GOOD, b"&xxe;")), "FORBIDDEN_XML_CONSTRUCT"),
    "parameter-entity": (after_decl(
        b'<!DOCTYPE MigrationGroupEncryptedFile [<!ENTITY % p SYSTEM "file:///etc/passwd">'
        b"%p;]>"), "FORBIDDEN_XML_CONSTRUCT"),
    "doctype-alone": (after_decl(b"<!DOCTYPE MigrationGroupEncryptedFile>"),
                      "FORBIDDEN_XML_CONSTRUCT"),
    "doctype-no-declaration": (b"<!DOCTYPE MigrationGroupEncryptedFile>\n" + GOOD[len(DECL):],
                               "FORBIDDEN_XML_CONSTRUCT"),
    "doctype-after-comment": (after_decl(b"<!-- hello -->\n<!DOCTYPE MigrationGroupEncryptedFile"
                                         b" SYSTEM \"file:///etc/passwd\">"),
                              "FORBIDDEN_XML_CONSTRUCT"),
    "undeclared-entity": (with_originator(GOOD, b"&xxe;"), "MALFORMED_XML"),
    # depth
    "deep-10000": (nested(10_000), ("FORBIDDEN_XML_CONSTRUCT", "MALFORMED_XML")),
    "deep-100": (nested(100), "FORBIDDEN_XML_CONSTRUCT"),
    # a flood of empty elements: 2 GB of tree from 64 MiB, refused before parsing
    "element-flood": (GOOD.replace(b"</MigrationHeader>", b"<x/>" * 200_000 +
                                   b"</MigrationHeader>", 1), "FORBIDDEN_XML_CONSTRUCT"),
    # wide and shallow, within the tag density: refused by the schema, walked in C
    "wide": (GOOD.replace(b"</MigrationHeader>", b"<xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/>"
                          * 20_000 + b"</MigrationHeader>", 1), "SCHEMA_INVALID"),
    # encodings
    "utf-16-bytes": (GOOD.decode().encode("utf-16"), "MALFORMED_XML"),
    "utf-16-declared": (GOOD.decode().replace("UTF-8", "UTF-16").encode("utf-16"),
                        "MALFORMED_XML"),
    "utf-16-be-no-bom": (GOOD.decode()[len(DECL):].encode("utf-16-be"), "MALFORMED_XML"),
    "latin-1-declared": (GOOD.replace(b"encoding='UTF-8'", b"encoding='ISO-8859-1'"),
                         "MALFORMED_XML"),
    "latin-1-bytes": (with_originator(GOOD, "SMSO-Caf\u00e9".encode("latin-1")),
                      "MALFORMED_XML"),
    # truncation and garbage
    "truncated-half": (GOOD[:len(GOOD) // 2], "MALFORMED_XML"),
    "truncated-end": (GOOD[:-30], "MALFORMED_XML"),
    "empty": (b"", "MALFORMED_XML"),
    "not-xml": (b"\x00\x01\x02 hello", "MALFORMED_XML"),
    # base64 and structure
    "content-cv-truncated": (set_text(GOOD, CONTENT_CV, cipher_text(GOOD, CONTENT_CV)[:-1]),
                             "SCHEMA_INVALID"),
    "content-cv-not-base64": (set_text(GOOD, CONTENT_CV, "!!" + cipher_text(GOOD, CONTENT_CV)),
                              "SCHEMA_INVALID"),
    "content-cv-empty": (set_text(GOOD, CONTENT_CV, ""), "SCHEMA_INVALID"),
    "ek-cv-truncated": (set_text(GOOD, EK_CV, ek_cv_padded(GOOD)[:-3]), "SCHEMA_INVALID"),
    "ek-cv-non-canonical": (set_text(GOOD, EK_CV, non_canonical(ek_cv_padded(GOOD))),
                            "SCHEMA_INVALID"),
    "mke-cv-truncated": (set_text(GOOD, MKE_CV, cipher_text(GOOD, MKE_CV)[:-2]),
                         "SCHEMA_INVALID"),
    "two-encrypted-data": (duplicate(GOOD, "//xenc:EncryptedData"), "SCHEMA_INVALID"),
    "other-root": (GOOD.replace(b"MigrationGroupEncryptedFile", b"SomethingElse"),
                   "SCHEMA_INVALID"),
}


def call(server, data: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        server.as_("s1sp").s1sp.ProcessGroupInformation(
            pb.ProcessGroupInformationRequest(file=data), timeout=60)
    return ei.value


def assert_serving(server) -> None:
    assert server.proc.poll() is None, "the server died"
    health = health_pb2_grpc.HealthStub(server.as_("s1sp").channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_is_refused_by_the_server_with_invalid_argument(server, name):
    data, want = HOSTILE[name]
    exc = call(server, data)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert error_reason(exc) in ((want,) if isinstance(want, str) else want), exc.details()
    assert "root:" not in (exc.details() or "")  # nothing of /etc/passwd comes back
    assert_serving(server)


def test_server_still_answers_good_calls_after_hostile_ones(server):
    for name in ("billion-laughs", "deep-10000", "utf-16-bytes", "two-encrypted-data"):
        call(server, HOSTILE[name][0])
    assert_serving(server)
    stub = server.as_("s1sp").s1sp
    # a real certificate of the ea-kw example, from a CA the session server trusts
    plain = (EXAMPLES / "ea-kw" / "plain.xml").read_bytes()
    cert = re.search(rb"<DeviceCertificate>([^<]+)</DeviceCertificate>", plain).group(1)
    chf = re.search(rb"<CHFIdentifier>([^<]+)</CHFIdentifier>", plain).group(1).decode()
    v = stub.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=base64.b64decode(cert), chf_identifier=chf), timeout=30)
    assert v.valid and v.device_id == chf, v
    # and the untouched example file goes all the way through parsing and the schema to
    # the key lookup (the session server does not hold the example's transport key)
    exc = call(server, GOOD)
    assert (exc.code(), error_reason(exc)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                               "UNKNOWN_TRANSPORT_KEY")


@contextmanager
def loopback_listener():
    """A port that must never see a connection: the parser fetches nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        yield listener.getsockname()[1]
        with pytest.raises(socket.timeout):
            listener.accept()


def test_external_dtd_is_never_fetched(server):
    with loopback_listener() as port:
        exc = call(server, after_decl(b'<!DOCTYPE MigrationGroupEncryptedFile SYSTEM '
                                      b'"http://127.0.0.1:%d/evil.dtd">' % port))
        assert error_reason(exc) == "FORBIDDEN_XML_CONSTRUCT"


# =========================================================================== in process
@pytest.mark.parametrize("name", ["billion-laughs", "external-entity", "deep-10000",
                                  "latin-1-bytes", "truncated-end", "ek-cv-non-canonical",
                                  "two-encrypted-data"])
def test_hostile_file_is_refused_in_process_too(app, name):
    data, want = HOSTILE[name]
    with pytest.raises(KeysvcError) as ei:
        s1sp.process_group_information(app, S1SP, data)
    assert ei.value.code in ((want,) if isinstance(want, str) else want)
    assert ei.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_file_over_the_size_limit_is_file_too_large(app):
    app.settings = dataclasses.replace(app.settings, max_file_bytes=len(GOOD) - 1)
    with pytest.raises(KeysvcError) as ei:
        s1sp.process_group_information(app, S1SP, GOOD)
    assert ei.value.code == "FILE_TOO_LARGE"
    assert ei.value.status == grpc.StatusCode.INVALID_ARGUMENT
    # exactly at the limit it is read (and then fails later, on the unknown transport key)
    app.settings = dataclasses.replace(app.settings, max_file_bytes=len(GOOD))
    with pytest.raises(KeysvcError) as ei:
        s1sp.process_group_information(app, S1SP, GOOD)
    assert ei.value.code == "UNKNOWN_TRANSPORT_KEY"


def test_size_limit_is_checked_before_parsing(app):
    app.settings = dataclasses.replace(app.settings, max_file_bytes=1024)
    bomb = after_decl(billion_laughs(), with_originator(GOOD, b"&lol9;"))
    with pytest.raises(KeysvcError) as ei:
        s1sp.process_group_information(app, S1SP, bomb + b" " * 1024)
    assert ei.value.code == "FILE_TOO_LARGE"


# =========================================================================== the plaintext
DP_ROOT = b"DecryptedS1SPDPGroupInformation"


@pytest.mark.parametrize("name,mutate,want", [
    ("billion-laughs", lambda p: billion_laughs(DP_ROOT) + p.replace(
        b"<GroupID>EA</GroupID>", b"<GroupID>&lol9;</GroupID>", 1),
     "FORBIDDEN_XML_CONSTRUCT"),
    ("external-entity", lambda p: b'<!DOCTYPE ' + DP_ROOT + b' [<!ENTITY x SYSTEM '
     b'"file:///etc/passwd">]>' + p, "FORBIDDEN_XML_CONSTRUCT"),
    ("doctype", lambda p: b"<!DOCTYPE " + DP_ROOT + b">" + p, "FORBIDDEN_XML_CONSTRUCT"),
    ("deep", lambda p: p.replace(b"</GroupID>", b"</GroupID>" + b"<x>" * 5000 + b"</x>" * 5000,
                                 1), ("FORBIDDEN_XML_CONSTRUCT", "MALFORMED_XML")),
    ("element-flood", lambda p: p.replace(b"</GroupID>", b"</GroupID>" + b"<x/>" * 100_000,
                                          1), "FORBIDDEN_XML_CONSTRUCT"),
    ("utf-16", lambda p: p.decode().encode("utf-16"), "MALFORMED_XML"),
    ("latin-1-declared", lambda p: b"<?xml version='1.0' encoding='ISO-8859-1'?>" + p,
     "MALFORMED_XML"),
    ("truncated", lambda p: p[:-40], "MALFORMED_XML"),
    ("empty", lambda p: b"", "MALFORMED_XML"),
])
def test_hostile_plaintext_is_refused_after_decryption(kit, name, mutate, want):  # noqa: F811
    insts = kit.installations(1)
    data = kit.file(insts, plaintext=mutate(plaintext_xml("EA", insts)))
    with pytest.raises(KeysvcError) as ei:
        kit.process(data)
    assert ei.value.code in ((want,) if isinstance(want, str) else want), ei.value.message
    assert ei.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "root:" not in ei.value.message
    assert count(kit.app, st.device_keys) == 0 and count(kit.app, st.migration_files) == 0


def test_file_over_the_servers_size_limit_is_file_too_large_not_a_transport_error(server):
    limit = 64 * 1024 * 1024  # the development default, max_file_bytes
    exc = call(server, GOOD + b" " * (limit - len(GOOD) + 1))
    assert (exc.code(), error_reason(exc)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "FILE_TOO_LARGE")
    assert_serving(server)


def test_schema_location_hint_is_never_fetched_and_xinclude_is_not_processed(server):
    with loopback_listener() as port:
        hinted = GOOD.replace(ROOT_OPEN, ROOT_OPEN[:-1] + (
            b' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation='
            b'"urn:keysvc:smets1:migration:1.2 http://127.0.0.1:%d/evil.xsd">' % port), 1)
        exc = call(server, hinted)
        assert error_reason(exc) == "UNKNOWN_TRANSPORT_KEY"  # read as usual, up to the key
        xinclude = GOOD.replace(b"</MigrationHeader>", b'<xi:include xmlns:xi="http://www.w3.org'
                                b'/2001/XInclude" href="http://127.0.0.1:%d/x" parse="text"/>'
                                b"</MigrationHeader>" % port, 1)
        exc = call(server, xinclude)
        assert error_reason(exc) == "SCHEMA_INVALID"
