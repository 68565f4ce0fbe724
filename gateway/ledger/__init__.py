"""The ledger: one row per request, written off the request path; reports and issued keys."""
