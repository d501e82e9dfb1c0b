"""The tasks, one module each (prepare -> run -> respond), mirroring `service.routers`."""
