"""The socket layer: meshline's WebSocket protocol (a sans-IO core), server and client."""
