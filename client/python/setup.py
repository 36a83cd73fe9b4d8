"""Builds the package, generating the gRPC stubs from the repository's proto/ (the contract)."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
# Output next to the package: the proto's path kvcompact/v1/ makes the stubs kvcompact.v1.*,
# which is also how the generated modules import each other.
GEN_ROOT = HERE
GEN = os.path.join(HERE, "kvcompact", "v1")


def generate_stubs():
    from grpc_tools import protoc  # build requirement
    import importlib.resources

    os.makedirs(GEN, exist_ok=True)
    proto = os.path.join(PROTO_ROOT, "kvcompact", "v1", "kvcompact.proto")
    if not os.path.exists(proto):
        if os.path.exists(os.path.join(GEN, "kvcompact_pb2.py")):
            return  # building from an sdist that already holds the stubs
        sys.exit(f"cannot find {proto}: build from the kvcompact repository checkout")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={GEN_ROOT}",
                      f"--grpc_python_out={GEN_ROOT}", proto])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    open(os.path.join(GEN, "__init__.py"), "a").close()


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


if __name__ == "__main__":
    if "egg_info" in sys.argv or "editable_wheel" in sys.argv or "bdist_wheel" in sys.argv:
        generate_stubs()
    setup(cmdclass={"build_py": BuildPyWithStubs})
