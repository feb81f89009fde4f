"""Helpers for testing applications built on meshline: real NATS servers, backend
suites, fault injection, and socket servers and clients for pytest-trio tests."""

from .._registry._suite import HOSTILE_CLIENT_IDS as HOSTILE_CLIENT_IDS
from .._registry._suite import RegistryBackendSuite as RegistryBackendSuite
from ._faults import FaultyTransport as FaultyTransport
from ._faults import restart_server as restart_server
from ._server import NatsServer as NatsServer
from ._server import NatsServerError as NatsServerError
from ._server import find_nats_server as find_nats_server
from ._server import free_port as free_port
from ._server import nats_cluster as nats_cluster
from ._sockets import MEMORY_URL as MEMORY_URL
from ._sockets import MemoryStreamOpener as MemoryStreamOpener
from ._sockets import open_memory_client as open_memory_client
from ._sockets import open_test_client as open_test_client
from ._sockets import open_test_socket_server as open_test_socket_server
