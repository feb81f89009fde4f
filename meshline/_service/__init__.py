"""The client service layer: a mesh node plus a client registry, reaching any client
wherever it is connected."""
