"""`Sandbox`: the fluent builder of `CreateOptions` (same methods as the published SDK 0.2.17).

box = Sandbox("alpine:latest").allow_host("api.example.com").with_memory(256)
vm_id = client.create(box.options())      # or client.launch(box) to start the image's entrypoint
"""

from __future__ import annotations

from .types import (
    CreateOptions,
    HostIPMapping,
    ImageConfig,
    MountConfig,
    NetworkInterceptionConfig,
    PortForward,
    Secret,
    VFSInterceptionConfig,
)


class Sandbox:
    """Every method changes the options in place and returns the builder."""

    def __init__(self, image: str) -> None:
        self._opts = CreateOptions(image=image)

    def options(self) -> CreateOptions:
        return self._opts

    # --- machine ---------------------------------------------------------------------------

    def from_snapshot(self, name: str) -> Sandbox:
        """Restore snapshot `name` (its image, memory and disks) instead of booting the image; the image
        may be "" and must otherwise be the snapshot's. Give its secrets again with `add_secret`."""
        self._opts.from_snapshot = name
        return self

    def with_privileged(self) -> Sandbox:
        self._opts.privileged = True
        return self

    def with_kernel(self, ref: str) -> Sandbox:
        """`file:///abs/path` or an OCI reference; empty means the default kernel."""
        self._opts.kernel_ref = ref
        return self

    def with_cpus(self, cpus: float) -> Sandbox:
        self._opts.cpus = cpus
        return self

    def with_memory(self, mb: int) -> Sandbox:
        self._opts.memory_mb = mb
        return self

    def with_disk_size(self, mb: int) -> Sandbox:
        self._opts.disk_size_mb = mb
        return self

    def with_timeout(self, seconds: int) -> Sandbox:
        self._opts.timeout_seconds = seconds
        return self

    # --- environment and image config ------------------------------------------------------

    def with_env(self, name: str, value: str) -> Sandbox:
        self._opts.env[name] = value
        return self

    def with_env_map(self, env: dict[str, str]) -> Sandbox:
        self._opts.env.update(env)
        return self

    def _image_config(self) -> ImageConfig:
        if self._opts.image_config is None:
            self._opts.image_config = ImageConfig()
        return self._opts.image_config

    def with_user(self, user: str) -> Sandbox:
        """Run commands as `uid`, `uid:gid` or a user name."""
        self._image_config().user = user
        return self

    def with_entrypoint(self, *entrypoint: str) -> Sandbox:
        self._image_config().entrypoint = list(entrypoint)
        return self

    def with_image_config(self, config: ImageConfig) -> Sandbox:
        """Overlay the non-empty fields of `config` on what is set already."""
        current = self._image_config()
        for name in ("user", "working_dir", "entrypoint", "cmd", "env"):
            value = getattr(config, name)
            if value:
                setattr(current, name, value)
        return self

    # --- network ---------------------------------------------------------------------------

    def allow_host(self, *hosts: str) -> Sandbox:
        self._opts.allowed_hosts.extend(hosts)
        return self

    def add_host(self, host: str, ip: str) -> Sandbox:
        self._opts.add_hosts.append(HostIPMapping(host=host, ip=ip))
        return self

    def with_block_private_ips(self, enabled: bool) -> Sandbox:
        self._opts.block_private_ips = enabled
        self._opts.block_private_ips_set = True
        return self

    def block_private_ips(self) -> Sandbox:
        return self.with_block_private_ips(True)

    def allow_private_ips(self) -> Sandbox:
        return self.with_block_private_ips(False)

    def unset_block_private_ips(self) -> Sandbox:
        self._opts.block_private_ips = False
        self._opts.block_private_ips_set = False
        return self

    def with_network_mtu(self, mtu: int) -> Sandbox:
        self._opts.network_mtu = mtu
        return self

    def with_no_network(self) -> Sandbox:
        self._opts.no_network = True
        return self

    def with_network_interception(self, config: NetworkInterceptionConfig | None = None) -> Sandbox:
        """Route traffic through the intercepting proxy, optionally with rules."""
        self._opts.force_interception = True
        self._opts.network_interception = config
        return self

    def add_secret(self, name: str, value: str, *hosts: str) -> Sandbox:
        self._opts.secrets.append(Secret(name=name, value=value, hosts=list(hosts)))
        return self

    def add_secret_with_placeholder(self, name: str, value: str, placeholder: str, *hosts: str) -> Sandbox:
        self._opts.secrets.append(Secret(name=name, value=value, hosts=list(hosts), placeholder=placeholder))
        return self

    def with_dns_servers(self, *servers: str) -> Sandbox:
        self._opts.dns_servers.extend(servers)
        return self

    def with_hostname(self, hostname: str) -> Sandbox:
        self._opts.hostname = hostname
        return self

    def with_port_forward(self, local_port: int, remote_port: int) -> Sandbox:
        """Applied right after create, like `client.port_forward`."""
        self._opts.port_forwards.append(PortForward(local_port=local_port, remote_port=remote_port))
        return self

    def with_port_forward_addresses(self, *addresses: str) -> Sandbox:
        self._opts.port_forward_addresses.extend(addresses)
        return self

    # --- files -----------------------------------------------------------------------------

    def with_workspace(self, path: str) -> Sandbox:
        self._opts.workspace = path
        return self

    def with_vfs_interception(self, config: VFSInterceptionConfig) -> Sandbox:
        self._opts.vfs_interception = config
        return self

    def mount(self, guest_path: str, config: MountConfig) -> Sandbox:
        self._opts.mounts[guest_path] = config
        return self

    def mount_host_dir(
        self, guest_path: str, host_path: str, *, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> Sandbox:
        config = MountConfig(type="host_fs", host_path=host_path, owner_uid=owner_uid, owner_gid=owner_gid)
        return self.mount(guest_path, config)

    def mount_host_dir_readonly(
        self, guest_path: str, host_path: str, *, owner_uid: int | None = None, owner_gid: int | None = None
    ) -> Sandbox:
        config = MountConfig(
            type="host_fs", host_path=host_path, readonly=True, owner_uid=owner_uid, owner_gid=owner_gid
        )
        return self.mount(guest_path, config)

    def mount_memory(self, guest_path: str) -> Sandbox:
        return self.mount(guest_path, MountConfig(type="memory"))

    def mount_overlay(self, guest_path: str, host_path: str) -> Sandbox:
        return self.mount(guest_path, MountConfig(type="overlay", host_path=host_path))
