"""Budgets: the ledger of leases and the queue of requests waiting for one."""
