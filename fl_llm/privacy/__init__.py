"""Privacy: differential privacy (record- and client-level), its accounting, and the audit."""
