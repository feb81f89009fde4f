"""Helpers for testing applications built on meshline: real NATS servers on loopback."""

from .._server import NatsServer as NatsServer
from .._server import NatsServerError as NatsServerError
from .._server import find_nats_server as find_nats_server
from .._server import free_port as free_port
from .._server import nats_cluster as nats_cluster
