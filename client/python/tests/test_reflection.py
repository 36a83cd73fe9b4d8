"""Server reflection and the JSON form of the unary RPCs, as grpcurl uses them: the descriptors come
from the server itself, not from local proto files."""
import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_reflection_lists_services_and_serves_descriptors(server_address):
    channel = grpc.insecure_channel(server_address)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "kvcompact.v1.KVCompact" in services
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("kvcompact.v1.KVCompact")
    assert {m.name for m in service.methods} >= {"Compact", "GetServerInfo", "SelfTest", "Sink"}

    # GetServerInfo with messages built only from the reflected descriptors, answered as JSON.
    method = service.FindMethodByName("GetServerInfo")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary("/kvcompact.v1.KVCompact/GetServerInfo",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_cls.FromString)
    info = json_format.MessageToDict(call(json_format.Parse("{}", request_cls()), timeout=10))
    assert info["backend"] in info["backends"]
    assert int(info["limits"]["maxMessageBytes"]) > 0
    channel.close()
