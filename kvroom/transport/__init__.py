"""Transport: NIXL agent, ZMQ control sockets, codec, CURVE auth, descriptors and staging."""
