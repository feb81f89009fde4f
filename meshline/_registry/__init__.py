"""The client registry layer: the registry and its backends, the presence wiring of a
node's registrations, and the backend conformance suite."""
