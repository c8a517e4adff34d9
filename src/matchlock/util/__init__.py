"""Host-side helpers below every cache and store: file locks, staging dirs, SQLite, Debian packages."""
