"""The transport layer: the seam every transport implements, buffers, names, and the
memory and NATS transports."""
