"""The `matchlock rpc` server: JSON-RPC on stdio for the SDKs (wire: docs/rpc.md)."""
