"""Several serving instances sharing KV blocks peer to peer: peer tier, index designs, transports, faults."""
