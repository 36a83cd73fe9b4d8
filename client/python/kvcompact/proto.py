"""The generated v1 messages and stubs (generated from proto/ when the package is built)."""
from kvcompact.v1 import kvcompact_pb2 as pb
from kvcompact.v1 import kvcompact_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
