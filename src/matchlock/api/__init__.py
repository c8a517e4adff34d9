"""Config and result types, validation, errors and well-known paths (stdlib only)."""
