"""gRPC with mutual TLS: the platform service's server and the coordinator's channel to it.

Each `PlatformAPI` method (and `hello`) is one stream-stream call of raw bytes,
``/fl_llm.Platform/<method>``: the request is a `wire` message cut into 1 MiB pieces, the reply
likewise; a service error is a gRPC status (`CODES`) whose details say what was wrong. No
protobuf code is generated: the message format is `fl_llm.remote.wire`'s.

The server requires a client certificate from the federation CA (`require_client_auth`); a
plaintext connection or a certificate from another CA fails the TLS handshake. The client checks
that the server's certificate names the platform it dialled (`ssl_target_name_override`), so an
address that answers with another party's certificate is refused too.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from fl_llm.errors import UserError
from fl_llm.remote.service import METHODS, SERVICE, PlatformService, ServiceError
from fl_llm.remote.tls import Credentials
from fl_llm.remote.wire import CHUNK, WireError, chunks, joined


def _codes():
    import grpc

    return {
        "protocol": grpc.StatusCode.INVALID_ARGUMENT,
        "refused": grpc.StatusCode.PERMISSION_DENIED,
        "stale": grpc.StatusCode.FAILED_PRECONDITION,
        "late": grpc.StatusCode.DEADLINE_EXCEEDED,
        "gone": grpc.StatusCode.UNAVAILABLE,  # the coordinator restarts it: hello builds a new one
        "failed": grpc.StatusCode.INTERNAL,
    }


OPTIONS = [
    ("grpc.max_receive_message_length", CHUNK + 4096),
    ("grpc.max_send_message_length", CHUNK + 4096),
]


def start_server(service: PlatformService, creds: Credentials, listen: str):
    """A started gRPC server for `service` on `listen` (host:port; port 0 picks one); returns
    (server, port)."""
    import grpc

    codes = _codes()

    def rpc(method):
        def handler(requests, context):
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            try:
                reply = service.handle(method, joined(requests, service.max_bytes), names)
            except ServiceError as e:
                context.abort(codes[e.kind], e.message)
            except WireError as e:
                context.abort(codes["protocol"], str(e))
            yield from chunks(reply)

        return grpc.stream_stream_rpc_method_handler(handler)

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {m: rpc(m) for m in METHODS})])
    credentials = grpc.ssl_server_credentials(
        [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True
    )
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise UserError(f"serve.listen {listen!r}: cannot listen there (taken, or not an address of this machine)")
    server.start()
    return server, port


def serve_forever(server) -> None:
    """Until SIGTERM or SIGINT; then stop taking calls, finish the ones in flight (5 s)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


class Channel:
    """The coordinator's mutual-TLS connection to one platform service."""

    def __init__(self, creds: Credentials, name: str, address: str):
        import grpc

        tls = grpc.ssl_channel_credentials(
            root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert
        )
        self.name, self.address = name, address
        self._channel = grpc.secure_channel(address, tls, options=[*OPTIONS, ("grpc.ssl_target_name_override", name)])
        self._stubs = {
            m: self._channel.stream_stream(f"/{SERVICE}/{m}", request_serializer=None, response_deserializer=None)
            for m in METHODS
        }

    def call(self, method: str, payload: bytes, timeout_s: float, max_bytes: int, wait: bool = False) -> bytes:
        """The reply's bytes; raises `grpc.RpcError` (its `.code()` says why) or `WireError`."""
        replies = self._stubs[method](chunks(payload), timeout=timeout_s, wait_for_ready=wait)
        return joined(replies, max_bytes)

    def close(self) -> None:
        self._channel.close()
