"""The mesh layer: nodes, their membership view, the wire format of node messages."""
