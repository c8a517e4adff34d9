"""Helpers shared by every test directory (pyproject puts `tests/` on sys.path: `from support.x import y`).

- `cli`: the `matchlock` console script and its result (`MATCHLOCK`, `run_matchlock`, `CLIResult`);
- `ports`: `free_port`;
- `loop_thread`: an asyncio loop on a long-lived thread, for sandboxes owned by sync tests;
- `tarballs`: tar entries and layers made from bytes;
- `images`: image configs, `docker save` archives, OCI manifests, indexes and layouts;
- `sample_image`: the three-layer sample image of the image tests and the check of its tree;
- `kernels`: stand-in tuned and fallback kernels in a cache directory;
- `hooks`: the policy-callback `HookServer`;
- `rpcwire`: `matchlock rpc` driven with raw JSON lines;
- `sdk_compat`: the published Python SDK in a throwaway venv.

Fixtures live in tests/conftest.py (`state_dir`, `cache_dir`, `cli`, `busybox_path`, `sandbox`, ...).
"""
