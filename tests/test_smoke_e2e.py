import json
from keysvc.api.v1 import keysvc_pb2 as pb
from tests.conftest import EXAMPLES

def test_server_processes_ea_example(server):
    d = EXAMPLES / "ea-kw"
    expect = json.loads((d / "expect.json").read_text())
    server.load_example_keys(d, expect)
    r = server.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=(d / "file.xml").read_bytes()))
    assert r.accepted_count == 3, r
    d = EXAMPLES / "eb-oaep"
    expect = json.loads((d / "expect.json").read_text())
    server.load_example_keys(d, expect)
    r = server.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=(d / "file.xml").read_bytes()))
    assert r.accepted_count == 4, r
    m = server.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=(d / "file.xml").read_bytes()))
    assert m.accepted_count == 4, m
