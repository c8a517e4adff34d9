"""Host VFS: providers (memory, host directory, overlay), a mount router, interception, the server.

The guest's FUSE daemon forwards kernel requests over the `matchlock.vfs` port; `server` decodes them
with `wire.vfs` and answers from `router`, which routes each node to the provider of the longest mount
prefix. Blocking filesystem calls run in a thread pool, many at once; everything the guest sends is
validated and bounded (`types.Limits`).
"""
