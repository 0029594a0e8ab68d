"""The Unix-socket JSON-RPC service (DESIGN section 6)."""
