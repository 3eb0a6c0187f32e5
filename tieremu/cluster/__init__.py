"""Several serving instances: peer tier, block index, transports, routers, P/D and the cluster simulator."""
