"""The gRPC code is generated from protos/ whenever the package is built, so that
`pip install .`, `pip install git+...` and a wheel give an importable keysvc (the generated
files are not committed). Everything else is in pyproject.toml."""
from __future__ import annotations

import importlib.resources

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = "protos/keysvc/api/v1/keysvc.proto"


class BuildWithProtos(build_py):
    def run(self) -> None:
        from grpc_tools import protoc
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        if protoc.main(["protoc", "-Iprotos", f"-I{include}", "--python_out=.",
                        "--grpc_python_out=.", "--pyi_out=.", PROTO]) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
