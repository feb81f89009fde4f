"""Sockets across the cluster (layer 6): presence of every connection, cluster queries,
interest routing of targeted delivery, and user presence."""
