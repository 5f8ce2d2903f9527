"""The gRPC code is generated from protos/ whenever the package is built, so that
`pip install .`, `pip install git+...` and a wheel give an importable keysvc (the generated
files are not committed). Everything else is in pyproject.toml."""
from __future__ import annotations

import importlib.resources
import os
import shutil
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = "protos/keysvc/api/v1/keysvc.proto"


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugins write the typed stubs (.pyi) of the messages and of
    the gRPC stubs, so that a caller's type checker sees every RPC's request and response."""
    where = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which(name, path=where)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return f"--plugin={name}={found}"


class BuildWithProtos(build_py):
    def run(self) -> None:
        from grpc_tools import protoc
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        if protoc.main(["protoc", "-Iprotos", f"-I{include}", "--python_out=.",
                        "--grpc_python_out=.", _plugin("protoc-gen-mypy"),
                        _plugin("protoc-gen-mypy_grpc"), "--mypy_out=.", "--mypy_grpc_out=.",
                        PROTO]) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
